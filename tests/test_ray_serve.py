"""camelid under Ray Serve (camelid.integrations.ray_serve): a local Ray instance, 2 replicas of
the engine behind Ray's HTTP proxy, spoken to with the official openai client: greedy answers equal
the model's own greedy decoding, whichever replica serves them. Skipped when ray is absent."""

import pytest
import torch

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")

from camelid import LlamaForCausalLM  # noqa: E402
from netutil import free_port  # noqa: E402


@pytest.mark.slow
def test_two_replicas_behind_rays_proxy_answer_as_the_model_alone(smollm2_gguf, smollm2_tokenizer):
    from camelid.integrations.ray_serve import deployment

    tok = smollm2_tokenizer
    model = LlamaForCausalLM.from_pretrained(smollm2_gguf)
    questions = ["Name a colour.", "What is 2 + 2?", "Say hello.", "Name a river.", "What is a map?", "Hi!"]
    want = []
    for q in questions:
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
        out = model.generate(torch.tensor([ids]), max_new_tokens=12, eos_token_id=tok.eos_token_ids)
        want.append(tok.decode(out[0, len(ids):].tolist(), skip_special_tokens=True))
    del model
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(deployment(model=str(smollm2_gguf), num_replicas=2, num_cpus=1, model_name="smollm2", max_batch=4),
                  route_prefix="/", name="camelid")
        status = serve.status().applications["camelid"].deployments["camelid"]
        assert status.replica_states.get("RUNNING") == 2
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=300)
        got = [client.chat.completions.create(model="smollm2", max_tokens=12, temperature=0,
                                              messages=[{"role": "user", "content": q}]).choices[0].message.content
               for q in questions]
        assert got == want
        assert [m.id for m in client.models.list().data] == ["smollm2"]
    finally:
        serve.shutdown()
        ray.shutdown()


def test_bad_replica_counts_are_refused():
    from camelid.integrations.ray_serve import deployment

    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="num_replicas must be a positive integer"):
            deployment(num_replicas=bad)
