"""What the train stage is built from: the Trainer and its levers, checkpoints that survive a kill,
multi-process launch, and the fused LoRA and varlen attention kernels."""
