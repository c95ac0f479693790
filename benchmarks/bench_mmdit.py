"""SD3 transformer (MMDiT) speed and memory here vs diffusers/torch on the same small configuration and weights.

    python benchmarks/bench_mmdit.py [--batch 2] [--size 32] [--repeats 5] [--tokens 64,256,1024,2304]

One diffusers SD3Transformer2DModel (SD3-shaped, small: see CONFIG) is saved and loaded into jaxdiff through
`jaxdiff.convert.from_diffusers`, so both sides hold identical weights. Float32 throughout.

Table 1, at batch --batch and a --size x --size latent, per implementation:
  forward    warm ms per forward pass (best of --repeats, implementations timed in turn)
  fwd+bwd    warm ms per forward + backward (gradient of a mean-square loss wrt all params)
  speed      torch ms / jaxdiff ms (above 1: jaxdiff is faster)
  GFLOP/s    XLA's cost-analysis FLOPs of the jax program / time (torch rows divide the same FLOPs)
  rel err    ||a - a_torch|| / ||a_torch|| for the output and for all parameter gradients together
plus both models with attention replaced by a cheap stand-in (q + k + v, which keeps every projection alive).

Table 2, batch 1, growing image-token counts (text length fixed): jaxdiff and torch forward ms, XLA's FLOPs,
compiled peak memory (memory_analysis(): temp + argument + output bytes) with and without attention. A size
whose forward took longer than --max_forward_s stops the scan.

Table 3, the same sizes: attention's share of the forward time, (a) 1 - (forward with the stand-in) / (full
forward), on each side; (b) `jaxdiff.models.attention.dot_product_attention` alone, jitted, at the shape each
block calls it with, times the number of blocks (torch's F.scaled_dot_product_attention and a plain two-einsum
attention alone beside it).

Prints the tables and writes them to BENCHMARKS.md (section "MMDiT (SD3 transformer)"). Needs torch +
diffusers in the same interpreter as jax: `pip install -e .[dev]`, or jaxdiff installed into a torch venv.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import tempfile
import time

# torch's OpenMP threads spin while waiting by default; on cores shared with other jobs a descheduled spinner
# stalls every parallel region (here: 2 threads ran the forward 40x slower than 1). Passive waiting fixes it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
import jaxdiff as jd  # noqa: E402
from jaxdiff.convert.common import export_params  # noqa: E402
from jaxdiff.convert.diffusers import torch_key_of  # noqa: E402
from jaxdiff.models import attention as attention_lib  # noqa: E402
from jaxdiff.models import mmdit as mmdit_lib  # noqa: E402
from bench_unet import interleaved_times, rel_err  # noqa: E402
from report import program_flops, write_section  # noqa: E402

# SD3-shaped and small: patch 2, 16 latent channels, 64-wide heads, text states and pooled vector wider than the
# model as SD3's T5 (4096) and CLIP pooled (2048) are; base grid 32 and position table 48 (SD3: 64 and 96).
CONFIG = dict(sample_size=64, patch_size=2, in_channels=16, num_layers=4, attention_head_dim=64,
              num_attention_heads=4, joint_attention_dim=512, caption_projection_dim=256,
              pooled_projection_dim=256, out_channels=16, pos_embed_max_size=48)
TEXT_LEN = 154  # 77 CLIP + 77 T5 tokens (SD3's pipeline: 77 + max_sequence_length)


def make_inputs(batch: int, size: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, size, size, CONFIG["in_channels"])).astype(np.float32)
    t = np.linspace(250, 750, batch).astype(np.float32)  # sigma * 1000
    context = rng.standard_normal((batch, TEXT_LEN, CONFIG["joint_attention_dim"])).astype(np.float32)
    pooled = rng.standard_normal((batch, CONFIG["pooled_projection_dim"])).astype(np.float32)
    return x, t, context, pooled


@contextlib.contextmanager
def attention_stand_in():
    """Traces the MMDiT with q + k + v in place of attention: O(L D) instead of O(L^2 D), projections kept."""
    real = mmdit_lib.dot_product_attention
    mmdit_lib.dot_product_attention = lambda q, k, v, **_: q + k + v
    try:
        yield
    finally:
        mmdit_lib.dot_product_attention = real


@contextlib.contextmanager
def torch_attention_stand_in():
    """The same stand-in for diffusers: its JointAttnProcessor2_0 calls F.scaled_dot_product_attention."""
    import torch.nn.functional as F

    real = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = lambda q, k, v, **_: q + k + v
    try:
        yield
    finally:
        F.scaled_dot_product_attention = real


def with_context(manager, fn):
    def call():
        with manager():
            return fn()
    return call


def peak_bytes(compiled) -> tuple[int, int]:
    """(temp + argument + output bytes, temp bytes) from XLA's memory analysis of a compiled program."""
    m = compiled.memory_analysis()
    return m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes, m.temp_size_in_bytes


def compile_forward(model, params, inputs, stand_in: bool = False):
    """Returns (call, compile seconds, FLOPs, compiled, output) for a jitted forward on fixed inputs."""
    forward = jax.jit(lambda p, x, t, c, y: model.apply({"params": p}, x, t, c, y))
    start = time.perf_counter()
    with attention_stand_in() if stand_in else contextlib.nullcontext():
        compiled = forward.lower(params, *inputs).compile()
    out = jax.block_until_ready(compiled(params, *inputs))
    compile_s = time.perf_counter() - start
    with attention_stand_in() if stand_in else contextlib.nullcontext():
        flops = program_flops(forward, params, *inputs)
    return (lambda: jax.block_until_ready(compiled(params, *inputs))), compile_s, flops, compiled, out


def jax_runners(model, params, inputs, stand_in: bool = False):
    """Forward and forward+backward of mean(out^2) wrt all params. Returns a dict of callables and facts."""
    forward, compile_s, flops, _, out = compile_forward(model, params, inputs, stand_in)
    loss = lambda p, *a: jnp.mean(jnp.square(model.apply({"params": p}, *a)))
    with attention_stand_in() if stand_in else contextlib.nullcontext():
        train = jax.jit(jax.value_and_grad(loss))
        train_flops = program_flops(train, params, *inputs)
        train = train.lower(params, *inputs).compile()
    _, grads = jax.block_until_ready(train(params, *inputs))
    return dict(forward=forward, train=lambda: jax.block_until_ready(train(params, *inputs)),
                compile_s=compile_s, flops=flops, train_flops=train_flops,
                out=np.asarray(out), grads=export_params(grads, torch_key_of))


def torch_inputs(inputs):
    import torch

    x, t, context, pooled = inputs
    return (torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))), torch.from_numpy(t),
            torch.from_numpy(context), torch.from_numpy(pooled))


def torch_forward(model, inputs):
    import torch

    x, t, context, pooled = torch_inputs(inputs)

    def forward():
        with torch.no_grad():
            return model(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled,
                         timestep=t).sample
    return forward


def torch_runners(model, inputs, stand_in: bool = False):
    import torch

    x, t, context, pooled = torch_inputs(inputs)
    forward = torch_forward(model, inputs)

    def train():
        model.zero_grad(set_to_none=True)
        out = model(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled, timestep=t).sample
        torch.mean(out ** 2).backward()

    if stand_in:
        forward, train = with_context(torch_attention_stand_in, forward), with_context(torch_attention_stand_in, train)

    train()  # warm-up, and the gradients compared below
    grads = {name: p.grad.numpy().copy() for name, p in model.named_parameters()}
    return dict(forward=forward, train=train, out=forward().numpy().transpose(0, 2, 3, 1), grads=grads)


def grads_rel_err(got: dict, want: dict) -> float:
    if set(got) != set(want):
        raise RuntimeError(f"gradient keys differ: only jaxdiff {sorted(set(got) - set(want))[:5]}, "
                           f"only torch {sorted(set(want) - set(got))[:5]}")
    diff = sum(np.sum((got[k].astype(np.float64) - want[k]) ** 2) for k in want)
    norm = sum(np.sum(want[k].astype(np.float64) ** 2) for k in want)
    return float(np.sqrt(diff / norm))


def comparison_table(model, params, torch_model, inputs, repeats: int) -> tuple[str, dict]:
    impls = {"jaxdiff fp32": jax_runners(model, params, inputs),
             "diffusers/torch fp32": torch_runners(torch_model, inputs),
             "jaxdiff fp32, attention -> q+k+v": jax_runners(model, params, inputs, stand_in=True),
             "diffusers/torch fp32, attention -> q+k+v": torch_runners(torch_model, inputs, stand_in=True)}
    fwd = interleaved_times({name: r["forward"] for name, r in impls.items()}, repeats)
    train = interleaved_times({name: r["train"] for name, r in impls.items()}, repeats)
    jx, tr = impls["jaxdiff fp32"], impls["diffusers/torch fp32"]
    errors = {"jaxdiff fp32": (f"{rel_err(jx['out'], tr['out']):.1e}", f"{grads_rel_err(jx['grads'], tr['grads']):.1e}"),
              "diffusers/torch fp32": ("0", "0")}
    rows = []
    for name, r in impls.items():
        jax_r = impls[name.replace("diffusers/torch", "jaxdiff")]   # FLOPs: the jax program of the same kind
        torch_name = name.replace("jaxdiff", "diffusers/torch")
        compile_col = f"{r['compile_s']:.1f}" if "compile_s" in r else "-"
        out_err, grad_err = errors.get(name, ("-", "-"))
        rows.append(f"| {name} | {compile_col} | {fwd[name]:.1f} | {train[name]:.1f} | "
                    f"{fwd[torch_name] / fwd[name]:.2f} | {train[torch_name] / train[name]:.2f} | "
                    f"{jax_r['flops'] / fwd[name] / 1e6:.1f} | {jax_r['train_flops'] / train[name] / 1e6:.1f} | "
                    f"{out_err} | {grad_err} |")
    table = "\n".join([
        "| implementation | compile s | forward ms | fwd+bwd ms | speed vs torch (fwd) | speed vs torch (fwd+bwd) | "
        "GFLOP/s (fwd) | GFLOP/s (fwd+bwd) | rel err output | rel err grads |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|", *rows])
    return table, dict(flops=jx["flops"], train_flops=jx["train_flops"])


def einsum_attention(q, k, v):
    """softmax(q k^T / sqrt(D)) v as two einsums over [B, H, L, D] (heads moved ahead of tokens): a yardstick
    for jaxdiff's attention function on CPU, not a jaxdiff code path. q, k, v: [B, L, H, D] -> [B, L, H, D]."""
    q, k, v = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))
    weights = jax.nn.softmax(jnp.einsum("bhqd,bhkd->bhqk", q, k) * q.shape[-1] ** -0.5, axis=-1)
    return jnp.swapaxes(jnp.einsum("bhqk,bhkd->bhqd", weights, v), 1, 2)


def attention_alone(seq: int, repeats: int) -> tuple[float, float, float]:
    """ms of one jitted dot_product_attention, one jitted einsum_attention and one torch SDPA at
    [1, seq, heads, head_dim] (best of repeats, timed in turn)."""
    import torch
    import torch.nn.functional as F

    heads, head_dim = CONFIG["num_attention_heads"], CONFIG["attention_head_dim"]
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((1, seq, heads, head_dim)).astype(np.float32) for _ in range(3))
    fn = jax.jit(attention_lib.dot_product_attention).lower(q, k, v).compile()
    plain = jax.jit(einsum_attention).lower(q, k, v).compile()
    qt, kt, vt = (torch.from_numpy(a.transpose(0, 2, 1, 3).copy()) for a in (q, k, v))

    def torch_sdpa():
        with torch.no_grad():
            return F.scaled_dot_product_attention(qt, kt, vt)
    want = torch_sdpa().numpy().transpose(0, 2, 1, 3)
    for f in (fn, plain):
        np.testing.assert_allclose(np.asarray(f(q, k, v)), want, atol=1e-4)
    ms = interleaved_times({"jax": lambda: jax.block_until_ready(fn(q, k, v)),
                            "plain": lambda: jax.block_until_ready(plain(q, k, v)), "torch": torch_sdpa}, repeats)
    return ms["jax"], ms["plain"], ms["torch"]


def scaling_table(model, params, torch_model, token_counts, repeats: int, max_forward_s: float):
    layers, p = CONFIG["num_layers"], CONFIG["patch_size"]
    speed_rows, attention_rows, skipped = [], [], []
    mib = 2 ** 20
    for i, n in enumerate(token_counts):
        side = int(round(n ** 0.5))
        if side * side != n:
            raise ValueError(f"--tokens {n} is not a square number of patches")
        inputs = make_inputs(1, side * p)
        reps = repeats if n <= 1024 else max(2, repeats // 2)
        full, compile_s, flops, compiled, _ = compile_forward(model, params, inputs)
        stand_in, _, _, compiled_si, _ = compile_forward(model, params, inputs, stand_in=True)
        torch_full = torch_forward(torch_model, inputs)
        ms = interleaved_times({"full": full, "stand_in": stand_in, "torch": torch_full,
                                "torch_stand_in": with_context(torch_attention_stand_in, torch_full)}, reps)
        attn_ms, plain_ms, sdpa_ms = attention_alone(n + TEXT_LEN, reps)
        peak, temp = peak_bytes(compiled)
        peak_si, temp_si = peak_bytes(compiled_si)
        speed_rows.append(
            f"| {n} | {side * p}x{side * p} | {n + TEXT_LEN} | {compile_s:.1f} | {ms['full']:.1f} | {ms['torch']:.1f} | "
            f"{ms['torch'] / ms['full']:.2f} | {flops / 1e9:.2f} | {flops / ms['full'] / 1e6:.1f} | "
            f"{peak / mib:.1f} ({temp / mib:.1f}) | {peak_si / mib:.1f} ({temp_si / mib:.1f}) |")
        attention_rows.append(
            f"| {n} | {n + TEXT_LEN} | {ms['stand_in']:.1f} | {1 - ms['stand_in'] / ms['full']:.0%} | "
            f"{ms['torch_stand_in']:.1f} | {1 - ms['torch_stand_in'] / ms['torch']:.0%} | {layers * attn_ms:.1f} | "
            f"{layers * attn_ms / ms['full']:.0%} | {layers * sdpa_ms:.1f} | {layers * sdpa_ms / ms['torch']:.0%} | "
            f"{layers * plain_ms:.1f} |")
        print(speed_rows[-1], attention_rows[-1], sep="\n", flush=True)
        if max(ms["full"], ms["torch"]) / 1e3 > max_forward_s:
            skipped = token_counts[i + 1:]
            break
    speed = "\n".join([
        "| image tokens | latent | sequence | compile s | jaxdiff fwd ms | torch fwd ms | speed vs torch | GFLOP | "
        "GFLOP/s | XLA peak MiB (temp) | XLA peak MiB (temp), attention -> q+k+v |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|", *speed_rows])
    attention = "\n".join([
        "| image tokens | sequence | jaxdiff fwd ms, attention -> q+k+v | jaxdiff attention share (a) | "
        "torch fwd ms, attention -> q+k+v | torch attention share (a) | "
        f"jaxdiff attention alone x{layers} ms | jaxdiff share (b) | torch SDPA alone x{layers} ms | torch share (b) | "
        f"two-einsum attention alone x{layers} ms |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|", *attention_rows])
    return speed, attention, skipped


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=32, help="latent side for table 1 (tokens = (size/2)^2)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", default="64,256,1024,2304", help="image-token counts for table 2 (squares)")
    parser.add_argument("--max_forward_s", type=float, default=3.0,
                        help="stop table 2 after a size whose jaxdiff or torch forward took longer")
    args = parser.parse_args()
    token_counts = [int(s) for s in args.tokens.split(",") if s]

    try:
        import torch
        from diffusers import SD3Transformer2DModel
    except ImportError as e:
        raise SystemExit(f"bench_mmdit compares against diffusers: install torch and diffusers beside jax ({e})")

    load_start = os.getloadavg()[0]
    start = time.perf_counter()
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    torch_model = SD3Transformer2DModel(**CONFIG).train()  # train(): no dropout here, so only autograd differs
    with tempfile.TemporaryDirectory() as tmp:
        torch_model.save_pretrained(tmp)
        model, params = jd.convert.from_diffusers(tmp)
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))

    table1, facts = comparison_table(model, params, torch_model, make_inputs(args.batch, args.size), args.repeats)
    print(table1, flush=True)
    table2, table3, skipped = scaling_table(model, params, torch_model, token_counts, args.repeats,
                                            args.max_forward_s)
    print(table2, table3, sep="\n\n", flush=True)

    c = CONFIG
    tokens1 = (args.size // c["patch_size"]) ** 2
    command = (f"python benchmarks/bench_mmdit.py --batch {args.batch} --size {args.size} --repeats {args.repeats} "
               f"--tokens {args.tokens} --max_forward_s {args.max_forward_s}")
    skipped_note = (f" Sizes {', '.join(map(str, skipped))} were not run: the previous one took over "
                    f"{args.max_forward_s:g} s per forward." if skipped else "")
    body = (
        f"`{command}` - {platform.machine()}, {os.cpu_count()} CPU cores shared with a training job and other "
        f"agents (load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end), jax "
        f"{jax.__version__}, torch {torch.__version__}, one interpreter for both; whole run "
        f"{time.perf_counter() - start:.0f} s; torch with {torch.get_num_threads()} threads and OMP_WAIT_POLICY="
        f"{os.environ.get('OMP_WAIT_POLICY')} (spinning OpenMP waits made torch up to 40x slower on the loaded "
        f"cores). Only ratios within a table mean much on this machine.\n\n"
        f"SD3-shaped transformer, {n_params / 1e6:.2f} M params: {c['num_layers']} joint blocks, "
        f"{c['num_attention_heads']} heads x {c['attention_head_dim']} = {c['num_attention_heads'] * c['attention_head_dim']} "
        f"wide, patch {c['patch_size']}, {c['in_channels']} latent channels, joint_attention_dim "
        f"{c['joint_attention_dim']}, pooled {c['pooled_projection_dim']}, {TEXT_LEN} text tokens. One diffusers "
        f"SD3Transformer2DModel, saved and loaded through `jaxdiff.convert.from_diffusers`: identical weights and "
        f"inputs, float32.\n\n"
        f"Batch {args.batch}, latent {args.size}x{args.size}x{c['in_channels']} ({tokens1} image + {TEXT_LEN} text "
        f"tokens); best of {args.repeats} warm calls, implementations timed in turn; forward "
        f"{facts['flops'] / 1e9:.2f} GFLOP, fwd+bwd {facts['train_flops'] / 1e9:.2f} GFLOP (XLA cost analysis of "
        f"the jax programs; torch rows divide the FLOPs of the jax program of the same kind by their time). Speed = "
        f"torch ms / jaxdiff ms of the same kind (above 1: jaxdiff faster). The training step is the gradient of "
        f"mean(out^2) wrt all params; rel err grads compares all parameter gradients at once (jaxdiff's exported "
        f"to torch layout). The 'attention -> q+k+v' rows are not models: the attention function on both sides is "
        f"replaced by q + k + v (every projection kept), to show how much of each time attention takes.\n\n"
        f"{table1}\n\n"
        f"Scaling with the image tokens at batch 1 ({TEXT_LEN} text tokens), forward only, best of {args.repeats} "
        f"(of {max(2, args.repeats // 2)} above 1024 tokens). XLA peak = temp + argument + output bytes of the "
        f"compiled forward (`memory_analysis()`; the float32 params are {4 * n_params / 2 ** 20:.1f} MiB of the "
        f"arguments), temp in brackets; the last column is the same program with attention -> q+k+v."
        f"{skipped_note}\n\n{table2}\n\n"
        f"Attention's share of the forward time, two ways: (a) 1 - (forward with attention -> q+k+v) / (full "
        f"forward), on each side; (b) `jaxdiff.models.attention.dot_product_attention` alone, jitted, at the "
        f"[1, sequence, {c['num_attention_heads']}, {c['attention_head_dim']}] shape each block calls it with, "
        f"times {c['num_layers']} blocks, over the full forward (torch: F.scaled_dot_product_attention alone over "
        f"torch's forward). (b) times the op outside the model, without the fusions around it, so it can read "
        f"above (a), even above 100%; small sizes are within noise (a share can read negative). The last column "
        f"is a yardstick, not jaxdiff's code: `einsum_attention` in this script (heads moved ahead of tokens, "
        f"two einsums and a softmax), at the same shape, timed in turn with (b).\n\n{table3}\n")
    write_section("MMDiT (SD3 transformer)", body)


if __name__ == "__main__":
    main()
