"""Mixed precision: the one autocast context every training and inference path uses."""
import contextlib

import torch


def autocast(amp, device):
    """The autocast context for `amp`: 'none' (a no-op), 'bf16' or 'fp16', or a config whose
    `amp` key says which."""
    if isinstance(amp, dict):
        amp = amp.get('amp', 'none')
    if amp == 'none':
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == 'bf16' else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_grad_scaler(config, device):
    """A GradScaler, enabled for fp16 on CUDA only (bf16 and float32 need none)."""
    enabled = config.get('amp', 'none') == 'fp16' and device.type == 'cuda'
    return torch.amp.GradScaler(device.type, enabled=enabled)
