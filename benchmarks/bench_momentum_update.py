"""Momentum-encoder update and the attention kernel: the original's code vs ours.

1. Momentum update of BLIP_Retrieval (ViT-B/16 + BERT-base MED, the online/momentum pairs of
   `model.model_pairs`). Baseline: the original's Python loop over parameter pairs,
   `param_m.data = param_m.data * m + param.data * (1 - m)` (three new tensors per parameter).
   Ours: models.momentum.momentum_update, two in-place torch._foreach_* calls.
2. Attention at BERT-base shapes (12 heads of 64): the original's explicit
   softmax(Q K^T / sqrt(d) + additive mask) V vs F.scaled_dot_product_attention with the same
   additive mask (BertSelfAttention._attend, what MED runs), for inference and for a training
   forward + backward; plus a whole BERT-base text encoder forward (ITM batch) with each kernel.

Times are medians of alternating runs; peak memory is the most CPU memory the allocator held
above its starting level during one call, read from torch.profiler(profile_memory=True).

    .venv/bin/python benchmarks/bench_momentum_update.py [--size base|small]
"""
import contextlib
import math

import torch

from _common import parse_args, peak_memory, print_header, print_markdown, report, setup, time_alternating
from models.blip_retrieval import blip_retrieval
from models.med import SELF_MASK_VALUE, BertSelfAttention
from models.momentum import momentum_update

SIZES = {
    'base': dict(image_size=384, text_batch=32, text_len=35, image_tokens=577, vit_batch=8, itm_batch=16),
    'small': dict(image_size=224, text_batch=8, text_len=35, image_tokens=197, vit_batch=2, itm_batch=4),
}
REPEATS = {'base': 7, 'small': 3}
MOMENTUM = 0.995
HEADS, HEAD_DIM = 12, 64


# ----------------------------------------------------------------------------- momentum update

@torch.no_grad()
def original_momentum_update(model_pairs, momentum):
    """The original's loop: a new tensor per parameter, assigned to .data."""
    for model, model_m in model_pairs:
        for param, param_m in zip(model.parameters(), model_m.parameters()):
            param_m.data = param_m.data * momentum + param.data * (1.0 - momentum)


def momentum_params(model):
    return [p for _, model_m in model.model_pairs for p in model_m.parameters()]


# ----------------------------------------------------------------------------- attention

def explicit_attention(query, key, value, mask):
    """The original's attention (models/med.py of BLIP, transformers 4.15 BERT)."""
    scores = torch.matmul(query, key.transpose(-1, -2)) / math.sqrt(query.shape[-1])
    if mask is not None:
        scores = scores + mask
    return torch.matmul(scores.softmax(dim=-1), value)


def fused_attention(module, query, key, value, mask):
    """What MED runs: BertSelfAttention._attend, i.e. F.scaled_dot_product_attention."""
    return module._attend(query, key, value, mask, None, False)[0]


@contextlib.contextmanager
def explicit_attention_in_med():
    """Route every MED attention through the original's explicit softmax."""
    fused = BertSelfAttention._attend

    def attend(self, query, key, value, mask, head_mask, output_attentions):
        return explicit_attention(query, key, value, mask), None

    BertSelfAttention._attend = attend
    try:
        yield
    finally:
        BertSelfAttention._attend = fused


def padding_mask(batch, length, generator):
    """Additive (B, 1, 1, L) mask as MED builds it: 0 for tokens, -10000 for padding."""
    lengths = torch.randint(length // 3, length + 1, (batch,), generator=generator)
    keep = (torch.arange(length)[None, :] < lengths[:, None]).float()
    return ((1.0 - keep) * SELF_MASK_VALUE)[:, None, None, :]


def fmt_mib(nbytes):
    return f'{nbytes / 2**20:.1f} MiB'


def main():
    args = parse_args(__doc__.splitlines()[0])
    setup(args)
    size = SIZES[args.size]
    repeats = args.repeats or REPEATS[args.size]
    print_header('Momentum update and attention kernel', args,
                 {**size, 'vit': 'base', 'text': 'BERT-base (configs/med_config.json)', 'dtype': 'float32'})
    rows, memory_rows = [], []

    # -- 1. momentum update -------------------------------------------------------------------
    model = blip_retrieval(image_size=size['image_size'], vit='base', queue_size=64)
    with torch.no_grad():  # make online and momentum weights differ, as after some training
        for _, model_m in model.model_pairs:
            for p in model_m.parameters():
                p.add_(torch.randn_like(p) * 1e-3)
    params_m = momentum_params(model)
    numel = sum(p.numel() for p in params_m)
    print(f'momentum update: {len(params_m)} parameter tensors, {numel / 1e6:.1f} M values per side')

    start = [p.detach().clone() for p in params_m]
    original_momentum_update(model.model_pairs, MOMENTUM)
    expected = [p.detach().clone() for p in momentum_params(model)]
    with torch.no_grad():
        for p, s in zip(momentum_params(model), start):
            p.copy_(s)
    momentum_update(model.model_pairs, MOMENTUM)
    for p, e in zip(momentum_params(model), expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-6, atol=1e-7)
    print('momentum update: fused result equals the loop (rtol 1e-6)')
    del start, expected

    times = time_alternating({'python loop': lambda: original_momentum_update(model.model_pairs, MOMENTUM),
                              '_foreach': lambda: momentum_update(model.model_pairs, MOMENTUM)},
                             repeats, args.warmup)
    rows.append(report(f'momentum update, {numel / 1e6:.0f} M parameters ({len(params_m)} tensors)',
                       times, 'python loop', '_foreach'))
    loop = lambda: original_momentum_update(model.model_pairs, MOMENTUM)
    memory_rows.append(('momentum update', peak_memory(loop, prepare=loop),
                        peak_memory(lambda: momentum_update(model.model_pairs, MOMENTUM))))

    # -- 2. attention kernel ------------------------------------------------------------------
    text_encoder = model.text_encoder.eval()
    model = None  # its memory is freed (the lambdas above are done with it)
    attn = text_encoder.encoder.layer[0].attention.self.eval()
    gen = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=gen)
    b, lt, li, bv = size['text_batch'], size['text_len'], size['image_tokens'], size['vit_batch']
    cases = [
        (f'text self-attention B={b} L={lt} (padding mask)',
         (rand(b, HEADS, lt, HEAD_DIM), rand(b, HEADS, lt, HEAD_DIM), rand(b, HEADS, lt, HEAD_DIM)),
         padding_mask(b, lt, gen)),
        (f'text cross-attention B={b} Lq={lt} Lk={li} (all-ones image mask)',
         (rand(b, HEADS, lt, HEAD_DIM), rand(b, HEADS, li, HEAD_DIM), rand(b, HEADS, li, HEAD_DIM)),
         torch.zeros(b, 1, 1, li)),
        (f'ViT-B self-attention B={bv} L={li} (no mask)',
         (rand(bv, HEADS, li, HEAD_DIM), rand(bv, HEADS, li, HEAD_DIM), rand(bv, HEADS, li, HEAD_DIM)),
         None),
    ]
    for name, (q, k, v), mask in cases:
        with torch.no_grad():
            torch.testing.assert_close(fused_attention(attn, q, k, v, mask), explicit_attention(q, k, v, mask),
                                       rtol=1e-4, atol=1e-5)
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
        grad_out = rand(*q.shape)

        def train_step(kernel):
            out = kernel(qg, kg, vg)
            torch.autograd.backward(out, grad_out)
            qg.grad = kg.grad = vg.grad = None

        explicit_fn = lambda a, b_, c: explicit_attention(a, b_, c, mask)
        fused_fn = lambda a, b_, c: fused_attention(attn, a, b_, c, mask)
        grads = []
        for kernel in (explicit_fn, fused_fn):
            torch.autograd.backward(kernel(qg, kg, vg), grad_out)
            grads.append([t.grad.clone() for t in (qg, kg, vg)])
            qg.grad = kg.grad = vg.grad = None
        for g_explicit, g_fused in zip(*grads):
            torch.testing.assert_close(g_fused, g_explicit, rtol=1e-4, atol=1e-5)
        print(f'{name}: outputs and gradients match')

        with torch.no_grad():
            times = time_alternating({'explicit softmax': lambda: explicit_attention(q, k, v, mask),
                                      'SDPA': lambda: fused_attention(attn, q, k, v, mask)},
                                     repeats, args.warmup)
        rows.append(report(f'{name}, inference', times, 'explicit softmax', 'SDPA'))
        times = time_alternating({'explicit softmax': lambda: train_step(explicit_fn),
                                  'SDPA': lambda: train_step(fused_fn)}, repeats, args.warmup)
        rows.append(report(f'{name}, forward + backward', times, 'explicit softmax', 'SDPA'))
        with torch.no_grad():
            memory_rows.append((f'{name}, inference', peak_memory(lambda: explicit_attention(q, k, v, mask)),
                                peak_memory(lambda: fused_attention(attn, q, k, v, mask))))
        memory_rows.append((f'{name}, forward + backward', peak_memory(lambda: train_step(explicit_fn)),
                            peak_memory(lambda: train_step(fused_fn))))

    # whole text encoder: ITM forward, every layer's self- and cross-attention through one kernel
    bi = size['itm_batch']
    ids = torch.randint(1000, 30000, (bi, lt), generator=gen)
    atts = (padding_mask(bi, lt, gen)[:, 0, 0, :] == 0).long()
    image = rand(bi, li, 768)
    image_atts = torch.ones(bi, li, dtype=torch.long)

    @torch.no_grad()
    def itm_forward():
        return text_encoder(ids, attention_mask=atts, encoder_hidden_states=image,
                            encoder_attention_mask=image_atts, return_dict=True).last_hidden_state

    def itm_forward_explicit():
        with explicit_attention_in_med():
            return itm_forward()

    torch.testing.assert_close(itm_forward(), itm_forward_explicit(), rtol=1e-4, atol=1e-4)
    print('text encoder forward: outputs match')
    times = time_alternating({'explicit softmax': itm_forward_explicit, 'SDPA': itm_forward},
                             max(3, repeats // 2), args.warmup)
    name = f'BERT-base text encoder forward (multimodal), {bi} texts x {lt} tokens, {li} image tokens'
    rows.append(report(name, times, 'explicit softmax', 'SDPA'))
    memory_rows.append((name, peak_memory(itm_forward_explicit), peak_memory(itm_forward)))

    print_markdown(rows, args)
    print('\n| case | baseline peak memory | ours peak memory | ratio |')
    print('|---|---|---|---|')
    for name, base_mem, ours_mem in memory_rows:
        ratio = f'{base_mem / ours_mem:.1f}x' if ours_mem >= 2**16 else 'n/a (ours: < 64 KiB)'
        print(f'| {name} | {fmt_mib(base_mem)} | {fmt_mib(ours_mem)} | {ratio} |')


if __name__ == '__main__':
    main()
