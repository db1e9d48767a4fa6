"""Fine-tuning: trainer (TrainConfig, Trainer: the step and the loop, checkpoint contents, resume),
finetune (the one-call finetune(...) and its process launch), data (JSONL -> masked rows),
checkpoints (atomic checkpoint folders, rotation, RNG files), metrics (bar, metrics.jsonl,
TensorBoard, MFU), fsdp (sharding and DCP checkpoints). Import from the modules themselves."""
