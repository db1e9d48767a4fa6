"""transformers' surface on camelid's model: `from_pretrained`, `generate`, `save_pretrained`.

The core LlamaForCausalLM (camelid/core/model.py) is what a Llama is and knows no file, loader or
decoding loop; this subclass adds the three methods transformers users call, each a thin call
into the layer that does the work (camelid/load.py, camelid/generation/). It lives above both, so
nothing below it imports upward to offer them. `camelid.LlamaForCausalLM` is this class.
"""

from __future__ import annotations

from camelid.core import model as core
from camelid.generation.generate import model_generate
from camelid.load import load, save


class LlamaForCausalLM(core.LlamaForCausalLM):
    @classmethod
    def from_pretrained(cls, name_or_path=None, **kwargs) -> "LlamaForCausalLM":
        """Load a checkpoint: HF folder, .gguf file, packaged model name (the default model when
        None) or HF repo id. Options: see camelid.load.load."""
        return load(name_or_path, model_cls=cls, **kwargs)

    def generate(self, input_ids, attention_mask=None, **kwargs):
        """transformers' `generate` surface (see camelid.generation.generate.model_generate)."""
        return model_generate(self, input_ids, attention_mask, **kwargs)

    def save_pretrained(self, directory, **kwargs):
        """A HF folder (safetensors, written atomically); a quantized model keeps its codes and
        reloads quantized (camelid.load.save)."""
        return save(self, directory, **kwargs)


def load_pretrained(name_or_path=None, **kwargs) -> LlamaForCausalLM:
    """`LlamaForCausalLM.from_pretrained` as a function."""
    return LlamaForCausalLM.from_pretrained(name_or_path, **kwargs)
