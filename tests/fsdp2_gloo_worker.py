"""Worker for test_distributed: one LoRA step on a tiny Llama sharded with torch FSDP2 over gloo (CPU).

Run by torchrun with 2 processes (or alone, unsharded, for the reference). Saves the adapter the way
accelerate's FSDP2 ``get_state_dict`` gathers it for ``FULL_STATE_DICT``: the full state dict on
rank 0 (``get_model_state_dict`` with full_state_dict, broadcast_from_rank0, cpu_offload), then
``PeftModel.save_pretrained(state_dict=...)``.
usage: fsdp2_gloo_worker.py MODEL_DIR OUT_DIR
"""

import os
import sys

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

model_dir, out_dir = sys.argv[1], sys.argv[2]
sharded = "WORLD_SIZE" in os.environ
torch.manual_seed(0)
model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                       LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
with torch.no_grad():  # LoRA B starts at zero; make it nonzero so the step changes A as well
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.normal_(0, 0.02)
if sharded:
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    dist.init_process_group("gloo")
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    assert all(isinstance(p, DTensor) for p in model.parameters()), "parameters must be sharded"
ids = torch.arange(3, 35).reshape(2, 16)  # every rank the same batch: the step equals the unsharded one
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
model(input_ids=ids, labels=ids).loss.backward()
opt.step()
if sharded:
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    if dist.get_rank() == 0:
        model.save_pretrained(out_dir, state_dict=state)
    dist.barrier()
    dist.destroy_process_group()
else:
    model.save_pretrained(out_dir)
