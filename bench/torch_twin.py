"""PyTorch twins of haic-pipe's CPU benchmark models, for bench/compare-torch.sh.

The same layers, sizes, batch, loss and optimiser as the Rust benchmark
(`bench/src/compare_bench.rs`), so the two training throughputs compare:

- vq: `pipelines/tiny.yaml`'s level 1 (encoder hidden 32, 2 residual blocks of
  16, two stride-2 4x4 convs, D 32; K 128 codes with EMA updates and
  straight-through gradients; the `ff` auxiliary decoder: conv 3x3, 2
  residual blocks, two 4x4 stride-2 transposed convs, conv 3x3 to 1
  channel; MSE + 0.25 x commitment), batch 64 of 32x32x1.
- ar: `tiny.yaml`'s decoder1, a gated PixelCNN (hidden 16, 4 layers, masked
  3x3 convs, vertical and horizontal stacks) conditioned on an 8x8 code map
  of 128 codes (embedding 16, conv 3x3, 1 residual block, two transposed
  convs up to 32x32), 256-way cross-entropy per pixel, batch 64.
- sample: 10 images from the ar model, value by value, the network re-run
  on the band of rows the next row can see (the quick way in PyTorch; the
  whole image per value is slower still).

Training steps: forward, backward, global-norm clipping at 1.0, AdamW
(lr 1e-3, betas 0.9/0.999, eps 1e-8, no weight decay). The inputs are
random (the cost does not depend on them). Prints one JSON line per model:
{"model", "seconds" (median per step, or per sampling run), "throughput"
(images/s)}.

- ops: each convolution layer shape of the two models alone, forward and
  backward at batch 64.

Usage: python bench/torch_twin.py [--steps N] [--threads T] [--only ops|vq|ar|sample]

With `--pipeline FILE [--device cuda] [--batch N] [--amp bf16]` (the device
check, bench/gpu-stage.sh): vq1 and decoder1 at that pipeline's sizes
(pipelines/imagenet128.yaml: 128x128x3), the twins of
`bench/src/gpu_bench.rs`, with the peak memory PyTorch allocated; with
`--only ops`, each of their convolution shapes alone, as gpu-bench's.
"""

import argparse
import contextlib
import json
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

BATCH = 64


class ResBlock(nn.Module):
    def __init__(self, channels, hidden):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, hidden, 3, padding=1)
        self.conv2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x):
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class VqLevel1(nn.Module):
    """A level-1 VQ level with the ff auxiliary decoder (tiny.yaml's by default)."""

    def __init__(self, hidden=32, res_hidden=16, dim=32, codes=128, channels=1, res_blocks=2, down=2):
        super().__init__()
        self.stem = nn.Conv2d(channels, hidden, 3, padding=1)
        self.down = nn.ModuleList([nn.Conv2d(hidden, hidden, 4, 2, 1) for _ in range(down)])
        self.enc_res = nn.ModuleList([ResBlock(hidden, res_hidden) for _ in range(res_blocks)])
        self.enc_out = nn.Conv2d(hidden, dim, 1)
        self.conv_in = nn.Conv2d(dim, hidden, 3, padding=1)
        self.dec_res = nn.ModuleList([ResBlock(hidden, res_hidden) for _ in range(res_blocks)])
        self.up = nn.ModuleList([nn.ConvTranspose2d(hidden, hidden, 4, 2, 1) for _ in range(down)])
        self.out = nn.Conv2d(hidden, channels, 3, padding=1)
        self.register_buffer("codebook", torch.randn(codes, dim))
        self.register_buffer("cluster_size", torch.zeros(codes))
        self.register_buffer("embed_sum", self.codebook.clone())

    def loss(self, x):
        h = self.stem(x)
        for d in self.down:
            h = d(F.relu(h))
        for r in self.enc_res:
            h = r(h)
        z = self.enc_out(F.relu(h))
        b, d, hh, ww = z.shape
        rows = z.permute(0, 2, 3, 1).reshape(-1, d)
        dist = (
            rows.pow(2).sum(1, keepdim=True)
            - 2 * rows @ self.codebook.t()
            + self.codebook.pow(2).sum(1)[None]
        )
        codes = dist.argmin(1)
        e = self.codebook[codes]
        st = rows + (e - rows).detach()
        commitment = (rows - e.detach()).pow(2).mean()
        h = self.conv_in(st.reshape(b, hh, ww, d).permute(0, 3, 1, 2))
        for r in self.dec_res:
            h = r(h)
        for u in self.up:
            h = u(F.relu(h))
        out = self.out(F.relu(h))
        loss = F.mse_loss(out, x) + 0.25 * commitment
        return loss, rows.detach(), codes

    @torch.no_grad()
    def ema_update(self, rows, codes, decay=0.99, eps=1e-5):
        k = self.codebook.shape[0]
        onehot = F.one_hot(codes, k).float()
        self.cluster_size.mul_(decay).add_(onehot.sum(0), alpha=1 - decay)
        self.embed_sum.mul_(decay).add_(onehot.t() @ rows, alpha=1 - decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + eps) / (n + k * eps) * n
        self.codebook.copy_(self.embed_sum / smoothed[:, None])


def mask(c_out, c_in, k, vertical, type_a):
    """haic-pipe's masks for one pixel channel (a single channel group)."""
    m = torch.zeros(c_out, c_in, k, k)
    centre = k // 2
    if vertical:
        m[:, :, :centre, :] = 1
        if not type_a:
            m[:, :, centre, :] = 1
    else:
        m[:, :, centre, :centre] = 1
        if not type_a:
            m[:, :, centre, centre] = 1
    return m


class MaskedConv(nn.Conv2d):
    def __init__(self, c_in, c_out, k, vertical, type_a):
        super().__init__(c_in, c_out, k, padding=k // 2)
        self.register_buffer("mask", mask(c_out, c_in, k, vertical, type_a))

    def forward(self, x):
        return F.conv2d(x, self.weight * self.mask, self.bias, padding=self.padding)


def gate(x):
    a, b = x.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


class GatedLayer(nn.Module):
    def __init__(self, c_in, h, k, first, cond_hidden):
        super().__init__()
        self.vertical = MaskedConv(c_in, 2 * h, k, True, first)
        self.horizontal = MaskedConv(c_in, 2 * h, k, False, first)
        self.v_to_h = nn.Conv2d(2 * h, 2 * h, 1)
        self.h_out = nn.Conv2d(h, h, 1)
        self.cond = nn.Conv2d(cond_hidden, 2 * h, 1)
        self.residual = not first

    def forward(self, v, h, cond):
        v_pre = self.vertical(v)
        h_pre = self.horizontal(h) + self.v_to_h(v_pre)
        extra = self.cond(cond)
        v_pre = v_pre + extra
        h_pre = h_pre + extra
        v = gate(v_pre)
        h_new = self.h_out(gate(h_pre))
        return v, (h + h_new if self.residual else h_new)


class PixelCnn(nn.Module):
    """A gated PixelCNN of pixels given a code map (tiny.yaml's decoder1 by
    default). With C > 1 channels haic-pipe splits the hidden channels into
    C groups and masks across them; the twin masks as for one channel: the
    same layer shapes, the same FLOPs."""

    def __init__(
        self, hidden=16, layers=4, k=3, codes=128, embed=16, cond_hidden=16,
        channels=1, cond_res_blocks=1, upsample=2,
    ):
        super().__init__()
        self.channels = channels
        self.embedding = nn.Embedding(codes, embed)
        self.cond_in = nn.Conv2d(embed, cond_hidden, 3, padding=1)
        self.cond_res = nn.ModuleList(
            [ResBlock(cond_hidden, cond_hidden // 2) for _ in range(cond_res_blocks)]
        )
        self.cond_up = nn.ModuleList(
            [nn.ConvTranspose2d(cond_hidden, cond_hidden, 4, 2, 1) for _ in range(upsample)]
        )
        self.layers = nn.ModuleList(
            [
                GatedLayer(channels if i == 0 else hidden, hidden, k, i == 0, cond_hidden)
                for i in range(layers)
            ]
        )
        self.out1 = nn.Conv2d(hidden, hidden, 1)
        self.out2 = nn.Conv2d(hidden, channels * 256, 1)
        self.rows_above = layers * (k // 2)

    def condition(self, code_map):
        f = self.cond_in(self.embedding(code_map).permute(0, 3, 1, 2))
        for r in self.cond_res:
            f = r(f)
        for u in self.cond_up:
            f = u(F.relu(f))
        return f

    def forward_with(self, x, cond):
        v = h = x
        for layer in self.layers:
            v, h = layer(v, h, cond)
        return self.out2(F.relu(self.out1(F.relu(h))))

    def loss(self, x, targets, code_map):
        logits = self.forward_with(x, self.condition(code_map))
        b, _, h, w = logits.shape
        # (B, C * 256, H, W), channel-major as haic-pipe's -> (B, 256, C, H, W).
        logits = logits.view(b, self.channels, 256, h, w).transpose(1, 2)
        return F.cross_entropy(logits, targets)

    @torch.no_grad()
    def sample(self, code_map, generator):
        n = code_map.shape[0]
        cond = self.condition(code_map)
        values = torch.zeros(n, 1, 32, 32, dtype=torch.long)
        for y in range(32):
            y0 = max(0, y - self.rows_above)
            for x in range(32):
                band = values[:, :, y0 : y + 1].float() / 255.0 - 0.5
                logits = self.forward_with(band, cond[:, :, y0 : y + 1])[:, :, -1, x]
                probs = torch.softmax(logits, dim=1)
                values[:, 0, y, x] = torch.multinomial(probs, 1, generator=generator)[:, 0]
        return values


def layers():
    """The layers of compare_bench.rs's `ops`: name, input (C, H, W), layer."""
    out = []
    for name, shape, (c, o, k, s, p) in [
        ("vq stem conv3x3 1->32, 32x32", (1, 32, 32), (1, 32, 3, 1, 1)),
        ("vq down conv4x4/2 32->32, 32x32", (32, 32, 32), (32, 32, 4, 2, 1)),
        ("vq res conv3x3 32->16, 8x8", (32, 8, 8), (32, 16, 3, 1, 1)),
        ("vq out conv3x3 32->1, 32x32", (32, 32, 32), (32, 1, 3, 1, 1)),
        ("ar 1x1 32->32, 32x32", (32, 32, 32), (32, 32, 1, 1, 0)),
    ]:
        out.append((name, shape, nn.Conv2d(c, o, k, s, p)))
    out.append(("vq up convT4x4/2 32->32, 16x16", (32, 16, 16), nn.ConvTranspose2d(32, 32, 4, 2, 1)))
    out.append(("ar masked conv3x3 16->32, 32x32", (16, 32, 32), MaskedConv(16, 32, 3, True, False)))
    return out


def ops(reps):
    """Median forward + backward (input gradient included) of (y * r).sum()."""
    for name, (c, h, w), layer in layers():
        x = torch.randn(BATCH, c, h, w, requires_grad=True)
        r = torch.randn_like(layer(x))
        times = []
        for i in range(reps + 2):
            t = time.perf_counter()
            y = layer(x)
            x.grad = None
            layer.zero_grad(set_to_none=True)
            (y * r).sum().backward()
            if i >= 2:
                times.append(time.perf_counter() - t)
        print(json.dumps({"op": name, "seconds": statistics.median(times)}), flush=True)


def train(model, batch_fn, steps, warmup, device="cpu", amp=None):
    """Median training step; on a GPU the batch's upload is in the step (as
    in haic-pipe's) and the step ends synchronised."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    times = []
    for i in range(steps + warmup):
        inputs = batch_fn()
        t = time.perf_counter()
        inputs = [x.to(device) for x in inputs]
        autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if amp == "bf16" else contextlib.nullcontext()
        )
        with autocast:
            out = model.loss(*inputs)
        loss = out[0] if isinstance(out, tuple) else out
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if isinstance(out, tuple):
            model.ema_update(out[1].float(), out[2])
        if device != "cpu":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def pipeline_models(path):
    """vq1's and decoder1's sizes from a pipeline file (imagenet128.yaml)."""
    import yaml

    stages = yaml.safe_load(open(path))["stages"]
    side = stages["prep"]["params"]["transforms"]["crop"]
    v = stages["vq1"]["params"]
    enc, dec = v["encoder"], v["decoder"]
    if dec.get("kind", "ff") != "ff" or dec["hidden"] != enc["hidden"]:
        raise SystemExit(f"{path}: the twin is of an ff decoder as wide as its encoder")
    codes = v["quantiser"]["codebook_size"]
    vq = dict(hidden=enc["hidden"], res_hidden=enc["res_hidden"], dim=enc["dim"], codes=codes,
              channels=3, res_blocks=enc["res_blocks"], down=enc["downsample"])
    d = stages["decoder1"]["params"]
    m = d["model"]
    code_side = side >> enc["downsample"]
    ar = dict(hidden=m["hidden"], layers=m["layers"], k=m["kernel"], codes=codes,
              embed=m["code_embedding"], cond_hidden=m["cond_hidden"], channels=3,
              cond_res_blocks=m["cond_res_blocks"], upsample=enc["downsample"])
    return side, code_side, codes, vq, v["batch_size"], ar, d["batch_size"]


def pipeline_ops(side, code_side, vq, ar, reps, device, amp=None):
    """gpu_bench.rs's `ops`: each convolution shape of vq1 (batch 64) and
    decoder1 (batch 16) alone, forward and backward with the input's
    gradient, the median of `reps` after 2 warm-ups, synchronised; the
    forward under bf16 autocast with `amp`."""
    h, r, a, ch, k = vq["hidden"], vq["res_hidden"], ar["hidden"], ar["cond_hidden"], ar["k"]
    specs = [
        (f"vq1 stem conv3x3 3->{h} at {side}", 64, (3, side), h, (3, 1, 1), False),
        (f"vq1 down conv4x4/2 {h}->{h} at {side}", 64, (h, side), h, (4, 2, 1), False),
        (f"vq1 res conv3x3 {h}->{r} at {code_side}", 64, (h, code_side), r, (3, 1, 1), False),
        (f"vq1 up convT4x4/2 {h}->{h} at {side // 2}", 64, (h, side // 2), h, (4, 2, 1), True),
        (f"vq1 out conv3x3 {h}->3 at {side}", 64, (h, side), 3, (3, 1, 1), False),
        (f"decoder1 conv{k}x{k} {a}->{2 * a} at {side}", 16, (a, side), 2 * a, (k, 1, k // 2), False),
        (f"decoder1 1x1 {2 * a}->{2 * a} at {side}", 16, (2 * a, side), 2 * a, (1, 1, 0), False),
        (f"decoder1 out 1x1 {a}->768 at {side}", 16, (a, side), 768, (1, 1, 0), False),
        (f"decoder1 cond convT4x4/2 {ch}->{ch} at {side // 2}", 16, (ch, side // 2), ch, (4, 2, 1), True),
    ]
    for name, batch, (c, s), out, (kk, stride, pad), transposed in specs:
        conv = nn.ConvTranspose2d if transposed else nn.Conv2d
        layer = conv(c, out, kk, stride, pad).to(device)
        x = torch.randn(batch, c, s, s, device=device, requires_grad=True)
        rr = torch.randn_like(layer(x))
        times = []
        for i in range(reps + 2):
            t = time.perf_counter()
            x.grad = None
            layer.zero_grad(set_to_none=True)
            with (torch.autocast("cuda", dtype=torch.bfloat16) if amp == "bf16"
                  else contextlib.nullcontext()):
                y = layer(x)
            (y.float() * rr).sum().backward()
            if device != "cpu":
                torch.cuda.synchronize()
            if i >= 2:
                times.append(time.perf_counter() - t)
        print(json.dumps({"impl": "torch", "op": name, "precision": amp or "f32",
                          "batch": batch, "seconds": statistics.median(times)}), flush=True)
        del layer, x, rr


def pipeline_bench(a):
    """`--pipeline FILE`: vq1 and decoder1 at the file's sizes, on a.device,
    one JSON line each with the peak memory PyTorch allocated."""
    side, code_side, codes, vq_sizes, vq_batch, ar_sizes, ar_batch_size = pipeline_models(a.pipeline)
    g = torch.Generator().manual_seed(1)
    cuda = a.device != "cpu"

    def run(name, make, batch_fn, batch, warmup):
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        model = make().to(a.device)
        s = train(model, batch_fn, a.steps, warmup, a.device, a.amp)
        row = {"model": name, "batch": batch, "precision": a.amp or "f32",
               "seconds": s, "throughput": batch / s}
        if cuda:
            row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        print(json.dumps(row), flush=True)
        del model

    if a.only == "ops":
        pipeline_ops(side, code_side, vq_sizes, ar_sizes, max(a.steps, 3), a.device, a.amp)
        return
    if a.only in (None, "vq"):
        b = a.batch or vq_batch
        run("vq1", lambda: VqLevel1(**vq_sizes),
            lambda: (torch.randint(0, 256, (b, 3, side, side), generator=g).float() / 255.0 - 0.5,),
            b, 2)
    if a.only in (None, "ar"):
        b = a.batch or ar_batch_size

        def ar_batch():
            t = torch.randint(0, 256, (b, 3, side, side), generator=g)
            codes_map = torch.randint(0, codes, (b, code_side, code_side), generator=g)
            return t.float() / 255.0 - 0.5, t, codes_map

        run("decoder1", lambda: PixelCnn(**ar_sizes), ar_batch, b, 2)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", choices=["ops", "vq", "ar", "sample"])
    p.add_argument("--sample-images", type=int, default=10)
    p.add_argument("--pipeline", help="vq1 and decoder1 at this pipeline's sizes (see pipeline_bench)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (with --pipeline)")
    p.add_argument("--batch", type=int, help="in place of the pipeline's batch sizes")
    p.add_argument("--amp", choices=["bf16"], help="bf16 autocast (with --pipeline)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    if a.pipeline:
        # Full f32 as candle computes (PyTorch's default lets cuDNN use TF32).
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        pipeline_bench(a)
        return
    g = torch.Generator().manual_seed(1)

    def pixels():
        return torch.randint(0, 256, (BATCH, 1, 32, 32), generator=g)

    if a.only in (None, "ops"):
        ops(max(a.steps, 5))
    if a.only in (None, "vq"):
        vq = VqLevel1()
        s = train(vq, lambda: (pixels().float() / 255.0 - 0.5,), a.steps, 3)
        print(json.dumps({"model": "vq", "seconds": s, "throughput": BATCH / s}), flush=True)
    if a.only in (None, "ar"):
        ar = PixelCnn()

        def ar_batch():
            t = pixels()
            codes = torch.randint(0, 128, (BATCH, 8, 8), generator=g)
            return t.float() / 255.0 - 0.5, t, codes

        s = train(ar, ar_batch, a.steps, 2)
        print(json.dumps({"model": "ar", "seconds": s, "throughput": BATCH / s}), flush=True)
    if a.only in (None, "sample"):
        ar = PixelCnn()
        n = a.sample_images
        codes = torch.randint(0, 128, (n, 8, 8), generator=g)
        times = []
        for _ in range(3):
            t = time.perf_counter()
            ar.sample(codes, g)
            times.append(time.perf_counter() - t)
        s = statistics.median(times)
        print(json.dumps({"model": "sample", "seconds": s, "throughput": n / s}), flush=True)


if __name__ == "__main__":
    main()
