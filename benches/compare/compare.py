#!/usr/bin/env python3
"""Side-by-side timing of cellmorph and PyTorch (and scikit-learn for the SVR
grid) on the same weights, the same input arrays and the same machine, in one
run. See benches/compare/README.md.

For every row the harness writes the input arrays (seeded numpy RNG) to a
safetensors file, runs `cellmorph bench WORKLOAD --input FILE --output OUT`
(one JSON line on stdout: median time over --iters after --warmup, device
synchronized per iteration, host<->device copies excluded), runs the PyTorch
reference on the same arrays already on the device (warmup, then per
iteration a synchronize, median; torch.inference_mode()), reads our output
back and compares it with PyTorch's f32 result.

ratio = our throughput / their throughput (= their median time / ours on the
same work): above 1 we are faster.

usage: python3 benches/compare/compare.py [--cellmorph PATH] [--device cpu|cuda]
          [--rows densenet,vqvae2,vqvae2train,densenettrain,cp2image,
          cp2imagetrain,conv,vq,hist,svr] [--quick]
          [--iters N] [--warmup N] [--append BENCHMARKS.md] [--json-out FILE]
          [--workdir DIR]
"""
import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))
sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, HERE)
import st  # noqa: E402


# The folder holding the complete fixture files; by default the repository's
# tests/fixtures, whose paper-size ones are seeded and expanded on first use.
FIXTURES = os.path.join(ROOT, "tests", "fixtures")


def fixture_file(h, name):
    """FIXTURES/name when it is there, else the complete file expanded into
    the work folder from the repository's seeded fixture
    (tests/fixtures/NAME.seeded.safetensors, see scripts/fixtures/seeded.py)."""
    path = os.path.join(FIXTURES, name)
    if os.path.isfile(path):
        return path
    stem = name[: -len(".safetensors")]
    seeded_path = os.path.join(ROOT, "tests", "fixtures", stem + ".seeded.safetensors")
    out = os.path.join(h.workdir, name)
    if not os.path.isfile(out):
        sys.path.insert(0, os.path.join(ROOT, "scripts", "fixtures"))
        import seeded
        seeded.expand(seeded_path, out, st.load, st.save)
    return out
ALL_ROWS = ["densenet", "vqvae2", "vqvae2train", "densenettrain", "cp2image", "cp2imagetrain", "conv", "vq",
            "hist", "svr"]
SEED = 20261121


class OursFailed(Exception):
    pass


# ------------------------------------------------------------------ formatting

def fmt_time(s):
    if s is None:
        return "—"
    if s >= 100:
        return f"{s:.0f} s"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} µs"


def fmt_rate(v, unit):
    if v is None:
        return "—"
    for div, pre in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if v >= div:
            return f"{v / div:.3g} {pre}{unit}"
    return f"{v:.3g} {unit}"


def fmt_ratio(x):
    if x >= 100:
        return f"{x:,.0f}×"
    return f"{x:.1f}×" if x >= 10 else f"{x:.2f}×"


def first_line(text):
    for line in (text or "").splitlines():
        line = line.strip()
        if line:
            return line[:200]
    return "(no message)"


def rel_err(a, b):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return f"shape {list(a.shape)} vs {list(b.shape)}"
    den = np.abs(b).max()
    return float(np.abs(a - b).max() / den) if den > 0 else float(np.abs(a - b).max())


def fmt_err(e):
    return e if isinstance(e, str) else f"{e:.1e}"


def frac_equal(a, b):
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        return f"shape {list(a.shape)} vs {list(b.shape)}"
    return float((a.astype(np.int64) == b.astype(np.int64)).mean())


def fmt_frac(f):
    if isinstance(f, str):
        return f
    return "100%" if f == 1.0 else f"{100 * f:.3f}%"


# ------------------------------------------------------------------ harness

class Harness:
    def __init__(self, a):
        self.a = a
        self.records = []
        self.variant_prec = {}
        self.notes = []
        self.torch = None
        self.torch_error = None
        if a.no_torch:
            self.torch_error = "--no-torch"
        else:
            try:
                import torch  # noqa: F401
                self.torch = torch
            except Exception as e:  # ImportError, or a broken install
                self.torch_error = f"{type(e).__name__}: {e}"
        dev = a.device
        if dev is None:
            dev = "cuda" if self.torch is not None and self.torch.cuda.is_available() else "cpu"
        self.device = dev
        self.cuda = dev.startswith("cuda")
        if self.torch is not None and self.cuda and not self.torch.cuda.is_available():
            self.torch_error = "torch is installed but torch.cuda.is_available() is False"
            self.torch = None
        if self.torch is not None:
            self.tdev = self.torch.device(dev)
            if self.cuda:
                # cuDNN autotuning: PyTorch at its best (the warmup absorbs the search)
                self.torch.backends.cudnn.benchmark = True
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    self.tf32_default = (self.torch.backends.cuda.matmul.allow_tf32,
                                         self.torch.backends.cudnn.allow_tf32)
                self.set_tf32(False, False)
        q = a.quick
        self.warmup = a.warmup if a.warmup is not None else (5 if self.cuda else (2 if q else 1))
        self.iters = a.iters if a.iters is not None else (20 if self.cuda else (10 if q else 5))
        self.workdir = a.workdir or tempfile.mkdtemp(prefix="cellmorph-compare-")
        os.makedirs(self.workdir, exist_ok=True)
        self.bin = a.cellmorph
        # our precisions; the pairs (ours, theirs) shown as rows
        self.ours_precisions = ["f32", "bf16", "f16"] if self.cuda else ["f32"]

    # ---------------------------------------------------------------- torch side

    def set_tf32(self, matmul, conv):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.torch.backends.cuda.matmul.allow_tf32 = matmul
            self.torch.backends.cudnn.allow_tf32 = conv

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def time_torch(self, fn):
        """fn() -> outputs. Median wall time over self.iters after self.warmup,
        synchronizing the device after each call. Returns (stats, last outputs)."""
        torch = self.torch
        out = None
        with torch.inference_mode():
            for _ in range(self.warmup):
                out = fn()
            self.sync()
            times = []
            for _ in range(self.iters):
                t0 = time.perf_counter()
                out = fn()
                self.sync()
                times.append(time.perf_counter() - t0)
        return {"median_s": statistics.median(times), "mean_s": statistics.fmean(times),
                "min_s": min(times)}, out

    def to_numpy(self, out):
        """Tensor or tuple/dict of tensors -> tuple/dict of float32/int64 numpy arrays."""
        torch = self.torch

        def cv(t):
            t = t.detach()
            if t.is_floating_point():
                t = t.float()
            return t.cpu().numpy()
        if isinstance(out, dict):
            return {k: cv(v) for k, v in out.items()}
        if isinstance(out, (tuple, list)):
            return tuple(cv(v) for v in out)
        if isinstance(out, torch.Tensor):
            return cv(out)
        return out

    def theirs_variants(self, kind):
        """The PyTorch variants to time: list of (label, setup), setup a dict with
        prec (the precision class it is compared in), cl (channels_last), amp
        (autocast dtype or None), cast (conv: operand dtype), tf32 (matmul, conv)."""
        torch = self.torch
        off = (False, False)
        tf32_on = self.cuda and any(self.tf32_default)
        v = []
        if kind == "model":
            v.append(("eager f32" + (" (TF32 off)" if self.cuda else ""),
                      {"prec": "f32", "cl": False, "amp": None, "tf32": off}))
            if tf32_on:
                v.append(("eager f32 (torch default: cuDNN TF32)",
                          {"prec": "f32", "cl": False, "amp": None, "tf32": self.tf32_default}))
            v.append(("channels_last + AMP bf16", {"prec": "bf16", "cl": True, "amp": torch.bfloat16, "tf32": off}))
            if self.cuda:
                v.append(("channels_last + AMP f16", {"prec": "f16", "cl": True, "amp": torch.float16, "tf32": off}))
        elif kind == "vqvae2":
            v = self.theirs_variants("model")
            # plain autocast computes the code distances in bf16, which changes many codes;
            # a careful user keeps the quantizer in f32: time that too
            v.insert(-1 if self.cuda else len(v),
                     ("channels_last + AMP bf16, Quantize in f32",
                      {"prec": "bf16", "cl": True, "amp": torch.bfloat16, "tf32": off, "vq_f32": True}))
        elif kind == "conv":
            v.append(("F.conv2d f32" + (" (TF32 off)" if self.cuda else ""),
                      {"prec": "f32", "cl": False, "cast": torch.float32, "tf32": off}))
            if tf32_on:
                v.append(("F.conv2d f32 (torch default: cuDNN TF32)",
                          {"prec": "f32", "cl": False, "cast": torch.float32, "tf32": self.tf32_default}))
            if self.cuda:
                v.append(("F.conv2d bf16", {"prec": "bf16", "cl": False, "cast": torch.bfloat16, "tf32": off}))
                v.append(("F.conv2d bf16 channels_last",
                          {"prec": "bf16", "cl": True, "cast": torch.bfloat16, "tf32": off}))
                v.append(("F.conv2d f16 channels_last",
                          {"prec": "f16", "cl": True, "cast": torch.float16, "tf32": off}))
        return v

    def pairs(self, kind, theirs_prec):
        """(our precision, their label) rows to report; theirs_prec: {label: precision}."""
        out = []
        for p in ["f32", "bf16", "f16"]:
            out += [(p, l) for l, q in theirs_prec.items() if q == p]
        if not self.cuda and kind != "conv":
            # their best CPU option (bf16 autocast) against our only one
            out += [("f32", l) for l, q in theirs_prec.items() if q != "f32"]
        return out

    # ---------------------------------------------------------------- our side

    def run_ours(self, workload, precision, args, inputs_path, tag):
        out_path = os.path.join(self.workdir, f"{tag}.ours-{precision}.out.safetensors")
        if os.path.exists(out_path):
            os.remove(out_path)
        cmd = [self.bin, "bench", workload, "--device", self.device, "--precision", precision,
               "--warmup", str(self.warmup), "--iters", str(self.iters), "--seed", str(SEED),
               "--input", inputs_path, "--output", out_path] + [str(x) for x in args]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True)
        except OSError as e:
            raise OursFailed(f"{self.bin}: {e}")
        if p.returncode != 0:
            err = [l for l in p.stderr.splitlines() if l.strip()]
            # the error line, not a progress line before it
            msg = next((l for l in err if "rror" in l), err[0] if err else f"exit status {p.returncode}")
            raise OursFailed(msg.strip()[:200])
        line = next((l for l in reversed(p.stdout.splitlines()) if l.strip().startswith("{")), None)
        if line is None:
            raise OursFailed("no JSON line on stdout: " + first_line(p.stdout))
        res = json.loads(line)
        outputs = st.load_tensors(out_path) if os.path.exists(out_path) else None
        if outputs is None:
            raise OursFailed(f"--output {out_path} was not written")
        res["cmd"] = " ".join(shlex.quote(c) for c in cmd)
        return res, outputs

    # ---------------------------------------------------------------- records

    def add(self, **r):
        base = {"row": "", "size": "", "ours": "", "ours_s": None, "ours_rate": None, "theirs": "",
                "theirs_s": None, "theirs_rate": None, "unit": "items/s", "ratio": None,
                "agreement": "", "status": "ok"}
        base.update(r)
        self.records.append(base)
        return base

    def model_rows(self, row, size, items, unit, ours, theirs, agree, flops=None, kind="model"):
        """ours: {precision: (json, outputs) or OursFailed}; theirs: {label: (stats, outputs) or
        Exception} (empty without torch); agree(outputs, ref) -> str, where ref is the output
        of the first (f32 strict) torch variant. One record per (ours, theirs) pair."""
        labels = list(theirs)
        ref = None
        if labels and not isinstance(theirs[labels[0]], Exception):
            ref = theirs[labels[0]][1]

        def rate_of(sec):
            if sec is None:
                return None
            return (flops if unit == "FLOP/s" else items) / sec

        if not labels:  # no torch: our rows alone
            why = "n/a (no torch)" if self.torch is None else "n/a"
            for p, r in ours.items():
                if isinstance(r, Exception):
                    self.add(row=row, size=size, ours=p, theirs=why, unit=unit, status=f"FAILED: {r}")
                else:
                    self.add(row=row, size=size, ours=p, ours_s=r[0]["median_s"],
                             ours_rate=rate_of(r[0]["median_s"]), theirs=why, unit=unit,
                             agreement=agree(r[1], None) if agree else "")
            return
        for p, lab in self.pairs(kind, {l: self.variant_prec[l] for l in labels}):
            if p not in ours:
                continue
            o, t = ours[p], theirs[lab]
            rec = self.add(row=row, size=size, ours=p, theirs=lab, unit=unit)
            fails = []
            if isinstance(o, Exception):
                fails.append(f"ours: {o}")
            else:
                rec["ours_s"] = o[0]["median_s"]
                rec["ours_rate"] = rate_of(rec["ours_s"])
                rec["ours_cmd"] = o[0].get("cmd")
            if isinstance(t, Exception):
                fails.append(f"theirs: {first_line(str(t)) or type(t).__name__}")
            else:
                rec["theirs_s"] = t[0]["median_s"]
                rec["theirs_rate"] = rate_of(rec["theirs_s"])
            if rec["ours_s"] and rec["theirs_s"]:
                rec["ratio"] = rec["theirs_s"] / rec["ours_s"]
            if fails:
                rec["status"] = "FAILED: " + "; ".join(fails)
            if ref is not None:
                parts = []
                if not isinstance(o, Exception):
                    parts.append("ours " + agree(o[1], ref))
                if lab != labels[0] and not isinstance(t, Exception):
                    parts.append("theirs " + agree(t[1], ref))
                rec["agreement"] = "; ".join(parts)

    def run_theirs_all(self, kind, fn_for):
        """fn_for(setup) -> zero-arg callable; times every variant of `kind`.
        Returns {label: (stats, numpy outputs) or Exception}."""
        if self.torch is None:
            return {}
        res = {}
        for label, setup in self.theirs_variants(kind):
            self.variant_prec[label] = setup["prec"]
            try:
                if self.cuda:
                    self.set_tf32(*setup["tf32"])
                fn = fn_for(setup)
                stats, out = self.time_torch(fn)
                res[label] = (stats, self.to_numpy(out))
            except Exception as e:  # OOM, unsupported dtype on this device, ...
                res[label] = e
                self.notes.append(f"torch {label}: {type(e).__name__}: {first_line(str(e))}")
            finally:
                if self.cuda:
                    self.set_tf32(False, False)
                    self.torch.cuda.empty_cache()
        return res

    def ours_all(self, workload, args, inp, tag, precisions=None):
        res = {}
        for p in precisions or self.ours_precisions:
            try:
                res[p] = self.run_ours(workload, p, args, inp, tag)
            except OursFailed as e:
                res[p] = e
        return res

    def write_inputs(self, tag, tensors):
        path = os.path.join(self.workdir, f"{tag}.in.safetensors")
        st.save(path, tensors)
        return path

    def to_dev(self, a, dtype=None):
        t = self.torch.from_numpy(np.ascontiguousarray(a)).to(self.tdev)
        return t if dtype is None else t.to(dtype)


# ------------------------------------------------------------------ rows

def amp_ctx(h, setup):
    torch = h.torch
    if setup.get("amp") is None:
        import contextlib
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda" if h.cuda else "cpu", dtype=setup["amp"])


def model_fn(h, module, x, setup, call=None):
    torch = h.torch
    m = module
    xx = x
    if setup["cl"]:
        m = module.to(memory_format=torch.channels_last)
        if x.dim() == 4:
            xx = x.contiguous(memory_format=torch.channels_last)
    else:
        m = module.to(memory_format=torch.contiguous_format)
        xx = x.contiguous()
    for sub in m.modules():
        if hasattr(sub, "force_f32"):
            sub.force_f32 = bool(setup.get("vq_f32"))
    f = call(m) if call else m

    def run():
        with amp_ctx(h, setup):
            return f(xx)
    return run


def densenet_weights(h):
    """The densenet121_kimhead fixture (expanded from the repository's seeded
    file where FIXTURES does not hold it)."""
    return fixture_file(h, "densenet121_kimhead.weights.safetensors")


def row_densenet(h):
    w_path = densenet_weights(h)
    if w_path is None:
        raise RuntimeError("no DenseNet121 weights: the densenet121_kimhead fixture is missing and PyTorch is not installed to make seeded ones")
    batch = 2 if h.a.quick else 64
    sizes = [(224, 224)] if h.a.quick else [(224, 224), (226, 306)]
    rng = np.random.default_rng(SEED)
    model = None
    if h.torch is not None:
        import torch_models as tm
        model = tm.DenseNetKim(st.load_tensors(w_path)).to(h.tdev)
    for H, W in sizes:
        x = rng.uniform(0, 1, size=(batch, 3, H, W)).astype(np.float32)
        tag = f"densenet-{H}x{W}-b{batch}"
        inp = h.write_inputs(tag, {"input": x})
        ours = h.ours_all("densenet", ["--weights", w_path, "--batch", batch], inp, tag)
        xt = h.to_dev(x) if model is not None else None
        theirs = h.run_theirs_all("model", lambda s: model_fn(h, model, xt, s))
        theirs = {k: (v if isinstance(v, Exception) else (v[0], {"logits": v[1][0], "probs": v[1][1]}))
                  for k, v in theirs.items()}

        def agree(o, ref):
            if ref is None:
                return ""
            lo = o["logits"]
            eq = int((lo.argmax(1) == ref["logits"].argmax(1)).sum())
            return (f"logits {fmt_err(rel_err(lo, ref['logits']))}, probs "
                    f"{fmt_err(rel_err(o['probs'], ref['probs']))}, argmax {eq}/{lo.shape[0]}")
        label = "DenseNet121+Kim head" if "kimhead" in w_path else "DenseNet121 (seeded weights)"
        h.model_rows(label, f"b{batch} 3×{H}×{W}", batch, "img/s", ours, theirs, agree)
        del xt


def vq_like_patches(rng, b, c=1, size=160):
    """Blocky low-frequency fields plus noise in [-1, 1] (8-bit scaling), image-like enough
    that the codebooks are used unevenly."""
    base = rng.uniform(-1, 1, size=(b, c, size // 8, size // 8))
    x = np.repeat(np.repeat(base, 8, axis=2), 8, axis=3) + rng.normal(0, 0.1, size=(b, c, size, size))
    return np.clip(x, -1, 1).astype(np.float32)


def row_vqvae2(h):
    w_path = fixture_file(h, "vqvae2_paper.weights.safetensors")
    batch = 16 if h.a.quick else 256
    rng = np.random.default_rng(SEED + 1)
    weights = st.load_tensors(w_path)
    cin = weights["enc_b.blocks.0.weight"].shape[1]
    x = vq_like_patches(rng, batch, cin)
    tag = f"vqvae2-b{batch}"
    inp = h.write_inputs(tag, {"input": x})
    ours = h.ours_all("vqvae2-profile", ["--weights", w_path, "--batch", batch], inp, tag)
    theirs = {}
    if h.torch is not None:
        import torch_models as tm
        model = tm.VQVAE2(weights).to(h.tdev)
        xt = h.to_dev(x)
        theirs = h.run_theirs_all("vqvae2", lambda s: model_fn(h, model, xt, s, call=lambda m: m.profile))
        theirs = {k: (v if isinstance(v, Exception) else
                      (v[0], dict(zip(["id_t", "id_b", "hist_t", "hist_b"], v[1]))))
                  for k, v in theirs.items()}

    def agree(o, ref):
        if ref is None:
            return ""
        ht = int((o["hist_t"].astype(np.int64) == ref["hist_t"]).all(axis=1).sum())
        hb = int((o["hist_b"].astype(np.int64) == ref["hist_b"]).all(axis=1).sum())
        return (f"codes t {fmt_frac(frac_equal(o['id_t'], ref['id_t']))}, b "
                f"{fmt_frac(frac_equal(o['id_b'], ref['id_b']))}; hist equal t {ht}/{batch}, b {hb}/{batch}")
    h.model_rows("VQ-VAE-2 profile (enc+VQ+hist)", f"b{batch} {cin}×160×160", batch, "patch/s",
                 ours, theirs, agree, kind="vqvae2")


def row_vqvae2_train(h):
    """One VQ-VAE-2 training step (forward, backward, EMA codebooks, Adam) from the same
    weights every iteration: `bench vqvae2-train-step` against vq-vae-2-pytorch's step in
    eager f32 (autograd, so not under inference_mode; the model and optimizer are rebuilt
    from the state_dict before each timed step, untimed). On our side the step's layers run on
    the device (Adam and the EMA codebook update on the host)."""
    w_path = fixture_file(h, "vqvae2_paper.weights.safetensors")
    batch = 4 if h.a.quick else 32
    rng = np.random.default_rng(SEED + 5)
    weights = st.load_tensors(w_path)
    cin = weights["enc_b.blocks.0.weight"].shape[1]
    x = vq_like_patches(rng, batch, cin)
    tag = f"vqvae2train-b{batch}"
    inp = h.write_inputs(tag, {"input": x})
    ours = h.ours_all("vqvae2-train-step", ["--weights", w_path, "--batch", batch], inp, tag,
                      precisions=["f32"])
    theirs = {}
    if h.torch is not None:
        import torch_models as tm
        torch = h.torch
        label = "eager f32, autograd + Adam"
        h.variant_prec[label] = "f32"
        try:
            xt = h.to_dev(x)

            def fresh():
                m = tm.VQVAE2(weights).to(h.tdev).train()
                return m, torch.optim.Adam(m.parameters(), lr=3e-4)
            times, out = [], None
            for i in range(h.warmup + h.iters):
                m, opt = fresh()
                h.sync()
                t0 = time.perf_counter()
                out = tm.vqvae2_train_step(m, opt, xt)
                h.sync()
                if i >= h.warmup:
                    times.append(time.perf_counter() - t0)
            stats = {"median_s": statistics.median(times), "mean_s": statistics.fmean(times),
                     "min_s": min(times)}
            theirs[label] = (stats, dict(zip(["loss", "id_t", "id_b"], h.to_numpy(out))))
        except Exception as e:
            theirs[label] = e
            h.notes.append(f"torch {label}: {type(e).__name__}: {first_line(str(e))}")

    def agree(o, ref):
        if ref is None:
            return ""
        return (f"loss {fmt_err(rel_err(np.asarray(o['loss']), np.asarray(ref['loss'])))}, codes t "
                f"{fmt_frac(frac_equal(o['id_t'], ref['id_t']))}, b {fmt_frac(frac_equal(o['id_b'], ref['id_b']))}")
    h.model_rows("VQ-VAE-2 training step", f"b{batch} {cin}×160×160", batch, "patch/s",
                 ours, theirs, agree, kind="train")


def time_train_step(h, label, fresh, step, names):
    """PyTorch's side of a training-step row: before each step, untimed,
    fresh() -> args (model and optimizer rebuilt from the state_dict, so every
    step starts from the same weights, as ours does); step(*args) timed with a
    synchronize; not under inference_mode (autograd). Returns {label: (stats,
    {name: numpy output of the last step})} or {label: Exception}."""
    h.variant_prec[label] = "f32"
    try:
        times, out = [], None
        for i in range(h.warmup + h.iters):
            args = fresh()
            h.sync()
            t0 = time.perf_counter()
            out = step(*args)
            h.sync()
            if i >= h.warmup:
                times.append(time.perf_counter() - t0)
        stats = {"median_s": statistics.median(times), "mean_s": statistics.fmean(times),
                 "min_s": min(times)}
        return {label: (stats, dict(zip(names, h.to_numpy(out))))}
    except Exception as e:
        h.notes.append(f"torch {label}: {type(e).__name__}: {first_line(str(e))}")
        return {label: e}


def row_densenet_train(h):
    """One DenseNet-121 + Kim head training step, every layer trained (`screen train
    --unfreeze all` per batch): `bench densenet-train-step` against the same step in
    PyTorch eager f32 (torchvision features + the head, train mode, class-weighted
    cross-entropy, AdamW lr 1e-4), same weights, images and labels; head dropout off on
    both sides so the first-step losses compare."""
    w_path = densenet_weights(h)
    batch = 2 if h.a.quick else 8
    H, W = (64, 64) if h.a.quick else (226, 306)
    rng = np.random.default_rng(SEED + 6)
    weights = st.load_tensors(w_path)
    x = rng.uniform(0, 1, size=(batch, 3, H, W)).astype(np.float32)
    labels = (np.arange(batch) % 2).astype(np.int64)
    tag = f"densenettrain-b{batch}"
    inp = h.write_inputs(tag, {"input": x, "labels": labels})
    ours = h.ours_all("densenet-train-step", ["--weights", w_path, "--batch", batch], inp, tag,
                      precisions=["f32"])
    theirs = {}
    if h.torch is not None:
        import torch_models as tm
        torch = h.torch
        # balanced weights of the batch, n / (classes·n_c), as ours
        counts = np.bincount(labels, minlength=2)
        cw = np.where(counts > 0, batch / (2.0 * np.maximum(counts, 1)), 1.0).astype(np.float32)
        xt, lt, cwt = h.to_dev(x), h.to_dev(labels), h.to_dev(cw)

        def fresh():
            m = tm.DenseNetKim(weights).to(h.tdev).train()
            return m, torch.optim.AdamW(m.parameters(), lr=1e-4, weight_decay=0.0), xt, lt, cwt
        theirs = time_train_step(h, "eager f32, autograd + AdamW", fresh, tm.densenet_train_step,
                                 ["loss", "logits"])

    def agree(o, ref):
        if ref is None:
            return ""
        return (f"loss {fmt_err(rel_err(np.asarray(o['loss']), np.asarray(ref['loss'])))}, logits "
                f"{fmt_err(rel_err(o['logits'], ref['logits']))}")
    h.model_rows("DenseNet121+Kim head training step (all layers)", f"b{batch} 3×{H}×{W}", batch,
                 "img/s", ours, theirs, agree, kind="train")


def cp2image_train_weights(h, p):
    """G (`cellmorph cp2image init-weights`, paper channels) and a seeded D (paper channels
    3,32,64,128,256,256; PyTorch's default init ranges, spectral-norm u, v normalized
    normal draws) in one file, under G. and D. — what `bench cp2image-train-step` reads."""
    path = os.path.join(h.workdir, f"cp2image_p{p}.train.safetensors")
    if os.path.exists(path):
        return path
    g_path = os.path.join(h.workdir, f"cp2image_p{p}.generator.safetensors")
    cmd = [h.bin, "cp2image", "init-weights", "--features", str(p), "--output", g_path, "--seed", "0"]
    pr = subprocess.run(cmd, capture_output=True, text=True)
    if pr.returncode != 0:
        raise RuntimeError(f"init-weights: {first_line(pr.stderr)}")
    out = {f"G.{k}": v for k, v in st.load_tensors(g_path).items()}
    rng = np.random.default_rng(SEED + 7)
    chans = [3, 32, 64, 128, 256, 256]
    for i in range(5):
        ci, co = chans[i], chans[i + 1]
        b = 1 / np.sqrt(ci * 9)
        u, v = rng.standard_normal(co), rng.standard_normal(ci * 9)
        out.update({
            f"D.blocks.{i}.conv.weight_orig": rng.uniform(-b, b, (co, ci, 3, 3)).astype(np.float32),
            f"D.blocks.{i}.conv.bias": rng.uniform(-b, b, co).astype(np.float32),
            f"D.blocks.{i}.conv.weight_u": (u / np.linalg.norm(u)).astype(np.float32),
            f"D.blocks.{i}.conv.weight_v": (v / np.linalg.norm(v)).astype(np.float32),
            f"D.blocks.{i}.bn.weight": np.ones(co, np.float32),
            f"D.blocks.{i}.bn.bias": np.zeros(co, np.float32),
            f"D.blocks.{i}.bn.running_mean": np.zeros(co, np.float32),
            f"D.blocks.{i}.bn.running_var": np.ones(co, np.float32),
        })
    fin = chans[-1] * 2 * 2
    b = 1 / np.sqrt(fin)
    out["D.fc.weight"] = rng.uniform(-b, b, (1, fin)).astype(np.float32)
    out["D.fc.bias"] = rng.uniform(-b, b, 1).astype(np.float32)
    st.save(path, out)
    return path


def row_cp2image_train(h):
    """One CP2Image training step (generator update, then discriminator update):
    `bench cp2image-train-step` against the same step in PyTorch eager f32 (spectral norm
    with a power iteration per forward, MSE + feature matching, BCE, Adam 2e-4 betas
    (0.5, 0.999)), same weights and batch, every iteration from the same weights."""
    batch = 8 if h.a.quick else 32
    p = 405
    try:
        w_path = cp2image_train_weights(h, p)
    except Exception as e:
        h.add(row="CP2Image training step", size=f"b{batch} p{p}", ours="—", theirs="—",
              status=f"FAILED: {first_line(str(e))}")
        return
    weights = st.load_tensors(w_path)
    rng = np.random.default_rng(SEED + 8)
    z = rng.standard_normal(size=(batch, p)).astype(np.float32)
    x = rng.uniform(0, 1, size=(batch, 3, 64, 64)).astype(np.float32)
    x_real = rng.uniform(0, 1, size=(batch, 3, 64, 64)).astype(np.float32)
    tag = f"cp2imagetrain-b{batch}"
    inp = h.write_inputs(tag, {"z": z, "x": x, "x_real": x_real})
    ours = h.ours_all("cp2image-train-step", ["--weights", w_path, "--batch", batch], inp, tag,
                      precisions=["f32"])
    theirs = {}
    if h.torch is not None:
        import torch_models as tm
        torch = h.torch
        gw = {k[2:]: v for k, v in weights.items() if k.startswith("G.")}
        dw = {k[2:]: v for k, v in weights.items() if k.startswith("D.")}
        zt, xt, rt = h.to_dev(z), h.to_dev(x), h.to_dev(x_real)

        def fresh():
            g = tm.CP2ImageGenerator(gw).to(h.tdev).train()
            d = tm.CP2ImageDiscriminator(dw).to(h.tdev).train()
            og = torch.optim.Adam(g.parameters(), lr=2e-4, betas=(0.5, 0.999))
            od = torch.optim.Adam(d.parameters(), lr=2e-4, betas=(0.5, 0.999))
            return g, d, og, od, zt, xt, rt
        theirs = time_train_step(h, "eager f32, autograd + Adam", fresh, tm.cp2image_train_step,
                                 ["loss_g", "loss_d"])

    def agree(o, ref):
        if ref is None:
            return ""
        return (f"loss_g {fmt_err(rel_err(np.asarray(o['loss_g']), np.asarray(ref['loss_g'])))}, loss_d "
                f"{fmt_err(rel_err(np.asarray(o['loss_d']), np.asarray(ref['loss_d'])))}")
    h.model_rows("CP2Image training step (G + D)", f"b{batch} p{p}, 3×64×64", batch, "img/s",
                 ours, theirs, agree, kind="train")


def row_cp2image(h):
    batch = 256 if h.a.quick else 4096
    p = 405
    w_path = os.path.join(h.workdir, "cp2image_paper_p405.generator.safetensors")
    ours = None
    if not os.path.exists(w_path):
        cmd = [h.bin, "cp2image", "init-weights", "--features", str(p), "--output", w_path, "--seed", "0"]
        pr = subprocess.run(cmd, capture_output=True, text=True)
        if pr.returncode != 0:
            msg = f"init-weights: {first_line(pr.stderr)}"
            h.add(row="CP2Image generator", size=f"b{batch} p{p}", ours="—", theirs="—",
                  status=f"FAILED: {msg}")
            return
    weights = st.load_tensors(w_path)
    rng = np.random.default_rng(SEED + 2)
    z = rng.standard_normal(size=(batch, p)).astype(np.float32)
    tag = f"cp2image-b{batch}"
    inp = h.write_inputs(tag, {"input": z})
    ours = h.ours_all("cp2image-generator", ["--weights", w_path, "--batch", batch], inp, tag)
    theirs = {}
    if h.torch is not None:
        import torch_models as tm
        model = tm.CP2ImageGenerator(weights).to(h.tdev)
        zt = h.to_dev(z)
        theirs = h.run_theirs_all("model", lambda s: model_fn(h, model, zt, s))
        theirs = {k: (v if isinstance(v, Exception) else (v[0], {"image": v[1]})) for k, v in theirs.items()}

    def agree(o, ref):
        if ref is None:
            return ""
        return f"image {fmt_err(rel_err(o['image'], ref['image']))}"
    h.model_rows("CP2Image generator", f"b{batch} p{p}→3×64×64 (untrained)", batch, "img/s",
                 ours, theirs, agree)


# name, c_in, c_out, k, stride, pad, H, W, batch (full), batch (quick)
CONVS = [
    ("DenseNet conv0 7×7/2", 3, 64, 7, 2, 3, 226, 306, 64, 2),
    ("DenseNet transition1 1×1", 256, 128, 1, 1, 0, 57, 77, 64, 2),
    ("DenseNet dense-layer 3×3", 128, 32, 3, 1, 1, 57, 77, 64, 2),
    ("VQ-VAE enc_b.0 4×4/2", 1, 64, 4, 2, 1, 160, 160, 64, 2),
    ("VQ-VAE enc_b.2 4×4/2", 64, 128, 4, 2, 1, 80, 80, 64, 2),
    ("VQ-VAE 3×3 128→128", 128, 128, 3, 1, 1, 40, 40, 64, 2),
    ("CP2Image blocks.1 3×3", 128, 64, 3, 1, 1, 8, 8, 1024, 32),
]


def row_conv(h):
    rng = np.random.default_rng(SEED + 3)
    for name, ci, co, k, s, pd, H, W, bfull, bq in CONVS:
        b = bq if h.a.quick else bfull
        x = rng.standard_normal(size=(b, ci, H, W)).astype(np.float32)
        w = (rng.standard_normal(size=(co, ci, k, k)) / np.sqrt(ci * k * k)).astype(np.float32)
        bias = (0.1 * rng.standard_normal(size=(co,))).astype(np.float32)
        Ho, Wo = (H + 2 * pd - k) // s + 1, (W + 2 * pd - k) // s + 1
        flops = 2.0 * b * co * Ho * Wo * ci * k * k
        tag = f"conv-{ci}-{co}-k{k}s{s}-{H}x{W}-b{b}"
        inp = h.write_inputs(tag, {"x": x, "w": w, "b": bias})
        args = ["--batch", b, "--height", H, "--width", W, "--c-in", ci, "--c-out", co,
                "--kernel", k, "--stride", s, "--pad", pd]
        precs = h.ours_precisions if h.cuda else ["f32", "bf16"]
        ours = h.ours_all("conv", args, inp, tag, precisions=precs)
        theirs = {}
        if h.torch is not None:
            F = h.torch.nn.functional
            xt, wt, bt = h.to_dev(x), h.to_dev(w), h.to_dev(bias)

            def fn_for(setup):
                xx, ww, bb = xt.to(setup["cast"]), wt.to(setup["cast"]), bt.to(setup["cast"])
                if setup["cl"]:
                    xx = xx.contiguous(memory_format=h.torch.channels_last)
                    ww = ww.contiguous(memory_format=h.torch.channels_last)
                return lambda: {"y": F.conv2d(xx, ww, bb, stride=s, padding=pd)}
            theirs = h.run_theirs_all("conv", fn_for)

        def agree(o, ref):
            return "" if ref is None else f"y {fmt_err(rel_err(o['y'], ref['y']))}"
        # on the CPU our bf16 is the rounding reference (CPU emulation of bf16 operands):
        # show it against their f32 rather than dropping it
        if not h.cuda and "bf16" in ours:
            labels = list(theirs)
            bf = ours.pop("bf16")
            h.model_rows(name, f"b{b} {ci}→{co} {H}×{W} k{k}/{s}", b, "FLOP/s", ours, theirs, agree, flops, kind="conv")
            if labels:
                only = {labels[0]: theirs[labels[0]]}
                h.model_rows(name, f"b{b} {ci}→{co} {H}×{W} k{k}/{s}", b, "FLOP/s", {"f32": bf}, only,
                             agree, flops, kind="conv")
                h.records[-1]["ours"] = "bf16 (CPU rounding ref.)"
            else:
                h.model_rows(name, f"b{b} {ci}→{co} {H}×{W} k{k}/{s}", b, "FLOP/s", {"bf16 (CPU rounding ref.)": bf},
                             theirs, agree, flops, kind="conv")
        else:
            h.model_rows(name, f"b{b} {ci}→{co} {H}×{W} k{k}/{s}", b, "FLOP/s", ours, theirs, agree, flops, kind="conv")
        if h.torch is not None and h.cuda:
            h.torch.cuda.empty_cache()


def row_vq(h):
    n = 8192 if h.a.quick else 65536
    dim, codes = 64, 512
    rng = np.random.default_rng(SEED + 4)
    z = rng.standard_normal(size=(n, dim)).astype(np.float32)
    cb = rng.standard_normal(size=(codes, dim)).astype(np.float32)
    tag = f"vq-n{n}"
    inp = h.write_inputs(tag, {"z": z, "codebook": cb})
    # exact reference: float64 distances
    z64, c64 = z.astype(np.float64), cb.astype(np.float64)
    d = (z64 ** 2).sum(1, keepdims=True) - 2 * z64 @ c64.T + (c64 ** 2).sum(1)[None, :]
    exact = d.argmin(1)
    ds = np.partition(d, 1, axis=1)[:, :2]
    near_ties = int((ds[:, 1] - ds[:, 0] < 1e-4 * np.abs(ds[:, 0]).clip(1)).sum())
    del d, ds
    ours = {}
    for p in ["f32"]:  # the lookup is f32 on every device
        try:
            ours[p] = h.run_ours("vq-lookup", p, ["--n", n, "--dim", dim, "--codes", codes], inp, tag)
        except OursFailed as e:
            ours[p] = e
    size = f"n{n} d{dim} K{codes}"

    def agree_exact(out):
        return f"{fmt_frac(frac_equal(out, exact))} = f64 argmin"
    variants = []
    if h.torch is not None:
        torch = h.torch
        zt, ct = h.to_dev(z), h.to_dev(cb)
        variants = [
            ("torch.cdist(z, e).argmin(1)", lambda: torch.cdist(zt, ct).argmin(1)),
            ("(z²−2z·eᵀ+e²).argmin(1)",
             lambda: ((zt * zt).sum(1, keepdim=True) - 2 * zt @ ct.T + (ct * ct).sum(1)[None, :]).argmin(1)),
        ]
    o = ours["f32"]
    if not variants:
        rec = h.add(row="VQ lookup", size=size, ours="f32", theirs="n/a (no torch)", unit="vec/s")
        if isinstance(o, Exception):
            rec["status"] = f"FAILED: ours: {o}"
        else:
            rec.update(ours_s=o[0]["median_s"], ours_rate=n / o[0]["median_s"],
                       agreement="ours " + agree_exact(o[1]["codes"]))
    for label, fn in variants:
        rec = h.add(row="VQ lookup", size=size, ours="f32", theirs=label, unit="vec/s")
        fails = []
        if isinstance(o, Exception):
            fails.append(f"ours: {o}")
        else:
            rec["ours_s"] = o[0]["median_s"]
            rec["ours_rate"] = n / rec["ours_s"]
        try:
            stats, out = h.time_torch(fn)
            rec["theirs_s"] = stats["median_s"]
            rec["theirs_rate"] = n / rec["theirs_s"]
            theirs_codes = out.cpu().numpy()
        except Exception as e:
            fails.append(f"theirs: {first_line(str(e))}")
            theirs_codes = None
        if rec["ours_s"] and rec["theirs_s"]:
            rec["ratio"] = rec["theirs_s"] / rec["ours_s"]
        parts = []
        if not isinstance(o, Exception):
            parts.append("ours " + agree_exact(o[1]["codes"]))
        if theirs_codes is not None:
            parts.append("theirs " + agree_exact(theirs_codes))
            if not isinstance(o, Exception):
                parts.append(f"ours=theirs {fmt_frac(frac_equal(o[1]['codes'], theirs_codes))}")
        rec["agreement"] = "; ".join(parts)
        if fails:
            rec["status"] = "FAILED: " + "; ".join(fails)
    h.notes.append(f"VQ lookup: {near_ties} of {n} vectors have a near-tie (f64 distance gap below 1e-4 "
                   f"relative) between their two nearest codes; 'f64 argmin' is the exact float64 answer")


def row_hist(h):
    n = (1 << 20) if h.a.quick else (1 << 24)
    bins = 512
    rng = np.random.default_rng(SEED + 5)
    codes = rng.integers(0, bins, size=n, dtype=np.int32)
    exact = np.bincount(codes, minlength=bins)
    tag = f"hist-n{n}"
    inp = h.write_inputs(tag, {"codes": codes})
    size = f"n{n} bins{bins}"
    try:
        o = h.run_ours("histogram", "f32", ["--n", n, "--bins", bins, "--segments", 1], inp, tag)
    except OursFailed as e:
        o = e

    def agree(hist):
        hist = np.asarray(hist).reshape(-1, bins).sum(0)
        return "equal" if np.array_equal(hist, exact) else f"DIFFER in {(hist != exact).sum()} bins"
    variants = []
    if h.torch is not None:
        torch = h.torch
        c32 = h.to_dev(codes)
        c64 = c32.long()
        variants = [("torch.bincount (int64 codes)", lambda: torch.bincount(c64, minlength=bins))]
        try:
            with torch.inference_mode():
                torch.bincount(c32[:16], minlength=bins)
            variants.append(("torch.bincount (int32 codes)", lambda: torch.bincount(c32, minlength=bins)))
        except Exception:
            pass
    if not variants:
        variants = [("n/a (no torch)", None)]
    for label, fn in variants:
        rec = h.add(row="Histogram", size=size, ours="i32", theirs=label, unit="code/s")
        fails, parts = [], []
        if isinstance(o, Exception):
            fails.append(f"ours: {o}")
        else:
            rec["ours_s"] = o[0]["median_s"]
            rec["ours_rate"] = n / rec["ours_s"]
            parts.append("ours " + agree(o[1]["hist"]))
        if fn is not None:
            try:
                stats, out = h.time_torch(fn)
                rec["theirs_s"] = stats["median_s"]
                rec["theirs_rate"] = n / rec["theirs_s"]
                parts.append("theirs " + agree(out.cpu().numpy()))
            except Exception as e:
                fails.append(f"theirs: {first_line(str(e))}")
        if rec["ours_s"] and rec["theirs_s"]:
            rec["ratio"] = rec["theirs_s"] / rec["ours_s"]
        rec["agreement"] = "; ".join(parts)
        if fails:
            rec["status"] = "FAILED: " + "; ".join(fails)


def row_svr(h):
    import svr_paper_grid as spg
    sk_genes = 1 if h.a.quick else 3
    size = f"{spg.N_GENES} genes × {len(spg.GRID_C) * len(spg.GRID_EPS)} settings × {spg.FOLDS} folds"
    # the SVR runs on the CPU: cellmorph's grid is a CPU solver unless --device cuda is asked for
    try:
        r = spg.run(h.bin, sk_genes=sk_genes, out=os.path.join(h.workdir, "svr"), device=h.device)
    except subprocess.CalledProcessError as e:
        h.add(row="SVR paper grid", size=size, ours="f64", theirs="GridSearchCV(n_jobs=-1)",
              unit="problem/s", status=f"FAILED: ours: {first_line(e.stderr)}")
        return
    except Exception as e:
        h.add(row="SVR paper grid", size=size, ours="f64", theirs="GridSearchCV(n_jobs=-1)",
              unit="problem/s", status=f"FAILED: {type(e).__name__}: {first_line(str(e))}")
        return
    P = r["problems"]
    rec = h.add(row="SVR paper grid", size=size, ours="f64 (whole command)", ours_s=r["ours_s"],
                ours_rate=P / r["ours_s"], unit="problem/s")
    if r["sk_total_s"] is None:
        rec["theirs"] = "n/a (no scikit-learn)"
        return
    rec["theirs"] = (f"sklearn {r['sklearn_version']} GridSearchCV(n_jobs=-1), timed on "
                     f"{r['sk_genes']} gene{'s' if r['sk_genes'] > 1 else ''}, ×{spg.N_GENES}/{r['sk_genes']}")
    rec["theirs_s"] = r["sk_total_s"]
    rec["theirs_rate"] = P / r["sk_total_s"]
    rec["ratio"] = r["sk_total_s"] / r["ours_s"]
    same = sum(1 for g in r["genes"] if g["sk_C"] == g["ours_C"] and abs(g["sk_epsilon"] - g["ours_epsilon"]) < 1e-9)
    dcv = max(abs(g["sk_cv"] - g["ours_cv"]) for g in r["genes"])
    rec["agreement"] = f"best (C, ε) same {same}/{len(r['genes'])}, |Δ best CV R²| ≤ {dcv:.1e}"


ROW_FUNCS = {"densenet": row_densenet, "vqvae2": row_vqvae2, "vqvae2train": row_vqvae2_train,
             "densenettrain": row_densenet_train, "cp2imagetrain": row_cp2image_train,
             "cp2image": row_cp2image, "conv": row_conv,
             "vq": row_vq, "hist": row_hist, "svr": row_svr}


# ------------------------------------------------------------------ report

COLS = ["row", "size", "ours", "time", "throughput", "theirs", "time ", "throughput ", "ratio", "agreement"]


def table_rows(records):
    out = []
    for r in records:
        failed = r["status"] != "ok"
        ratio = "n/a" if r["ratio"] is None else fmt_ratio(r["ratio"])
        agreement = r["agreement"]
        if failed:
            ratio = "FAILED" if r["ratio"] is None else ratio
            agreement = (r["status"] + ("; " + agreement if agreement else ""))
        out.append([r["row"], r["size"], r["ours"], fmt_time(r["ours_s"]), fmt_rate(r["ours_rate"], r["unit"]),
                    r["theirs"], fmt_time(r["theirs_s"]), fmt_rate(r["theirs_rate"], r["unit"]), ratio, agreement])
    return out


def plain_table(records):
    rows = table_rows(records)
    head = ["row", "size", "ours", "time", "throughput", "theirs", "time", "throughput", "ratio", "agreement"]
    widths = [max(len(head[i]), *(len(r[i]) for r in rows)) if rows else len(head[i]) for i in range(len(head))]
    widths[-1] = len(head[-1])  # last column unpadded
    right = {3, 4, 6, 7, 8}

    def line(cells):
        return "  ".join(c.rjust(widths[i]) if i in right else c.ljust(widths[i])
                         for i, c in enumerate(cells)).rstrip()
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


def md_table(records):
    rows = table_rows(records)
    head = "| row | size | ours | time | throughput | theirs | time | throughput | ours/theirs | agreement |"
    sep = "| --- | --- | --- | ---: | ---: | --- | ---: | ---: | ---: | --- |"
    esc = [[c.replace("|", "\\|") for c in r] for r in rows]
    return "\n".join([head, sep] + ["| " + " | ".join(r) + " |" for r in esc])


def device_name(h):
    if h.cuda:
        if h.torch is not None:
            return h.torch.cuda.get_device_name(h.tdev)
        try:
            p = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=20)
            if p.returncode == 0 and p.stdout.strip():
                return p.stdout.strip().splitlines()[0]
        except (OSError, subprocess.TimeoutExpired):
            pass
        return "CUDA device"
    model = platform.processor() or "CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} logical cores"


def git_hash():
    try:
        p = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        if p.returncode != 0:
            return "unknown"
        rev = p.stdout.strip()
        d = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True)
        return rev + ("+dirty" if d.stdout.strip() else "")
    except OSError:
        return "unknown"


def main():
    global FIXTURES
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cellmorph", default=None,
                    help="cellmorph binary (default target/release/cellmorph, else target/debug/cellmorph)")
    ap.add_argument("--device", choices=["cpu", "cuda"] + [f"cuda:{i}" for i in range(16)], default=None,
                    help="default: cuda if torch.cuda.is_available() else cpu")
    ap.add_argument("--rows", default=",".join(ALL_ROWS), help="comma-separated subset of " + ",".join(ALL_ROWS))
    ap.add_argument("--quick", action="store_true", help="small batches for a few-core CPU")
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--append", metavar="BENCHMARKS.md", default=None)
    ap.add_argument("--note", default=None, help="a sentence written under the appended section's heading")
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--no-torch", action="store_true", help="time cellmorph alone, as on a machine without torch")
    ap.add_argument("--fixtures", default=None, help="a folder of complete fixture files (default: the repository's tests/fixtures, seeded ones expanded)")
    a = ap.parse_args()
    if a.fixtures:
        FIXTURES = os.path.abspath(a.fixtures)
    rows = [r.strip() for r in a.rows.split(",") if r.strip()]
    bad = [r for r in rows if r not in ROW_FUNCS]
    if bad:
        ap.error(f"unknown rows {bad}; choose from {','.join(ALL_ROWS)}")
    if a.cellmorph is None:
        rel = os.path.join(ROOT, "target", "release", "cellmorph")
        dbg = os.path.join(ROOT, "target", "debug", "cellmorph")
        a.cellmorph = rel if os.path.exists(rel) else dbg
    is_debug = os.path.basename(os.path.dirname(os.path.abspath(a.cellmorph))) == "debug"
    if is_debug:
        print(f"WARNING: {a.cellmorph} is a debug build; its timings mean nothing", file=sys.stderr)

    h = Harness(a)
    torch_v = h.torch.__version__ if h.torch is not None else None
    dev_name = device_name(h)
    print(f"device: {h.device} ({dev_name}); cellmorph: {a.cellmorph} ({git_hash()}); "
          f"torch: {torch_v or 'not available: ' + str(h.torch_error)}; warmup {h.warmup}, iters {h.iters}; "
          f"workdir {h.workdir}", flush=True)
    if h.torch is None:
        print("PyTorch is not available: reporting cellmorph's rows alone (ratio n/a).", flush=True)
        h.notes.append(f"PyTorch not available ({h.torch_error}): cellmorph's rows alone, ratio n/a")
    elif not h.cuda:
        print(f"torch CPU threads: {h.torch.get_num_threads()}", flush=True)
    if h.torch is not None and not h.cuda:
        h.notes.append(f"torch CPU threads {h.torch.get_num_threads()}")

    load0 = os.getloadavg() if hasattr(os, "getloadavg") else None
    t_start = time.perf_counter()
    for r in rows:
        n0 = len(h.records)
        t0 = time.perf_counter()
        try:
            ROW_FUNCS[r](h)
        except Exception as e:  # a harness/torch failure: report it, go on
            traceback.print_exc()
            h.add(row=r, ours="—", theirs="—", status=f"FAILED: {type(e).__name__}: {first_line(str(e))}")
        print(f"[{r}: {time.perf_counter() - t0:.1f} s]", flush=True)
        print(plain_table(h.records[n0:]).split("\n", 2)[-1], flush=True)
    total = time.perf_counter() - t_start
    if load0 is not None:
        load1 = os.getloadavg()
        h.notes.append(f"load average (1 min) {load0[0]:.1f} at the start, {load1[0]:.1f} at the end "
                       f"({os.cpu_count()} logical cores)")

    print()
    print(plain_table(h.records))
    for n in h.notes:
        print("note:", n)
    failed = [r for r in h.records if r["status"] != "ok"]
    print(f"{len(h.records)} rows, {len(failed)} failed, {total:.0f} s")

    argv = list(sys.argv[1:])
    for i, x in enumerate(argv):  # the note is printed under the heading; keep the command short
        if x == "--note" and i + 1 < len(argv):
            argv[i + 1] = "…"
        elif x.startswith("--note="):
            argv[i] = "--note=…"
    cmdline = "python3 " + " ".join(shlex.quote(x) for x in
                                    [os.path.relpath(os.path.abspath(sys.argv[0]), os.getcwd())] + argv)
    meta = {"date": datetime.date.today().isoformat(), "device": h.device, "device_name": dev_name,
            "torch": torch_v, "torch_threads": h.torch.get_num_threads() if h.torch is not None else None,
            "cellmorph": a.cellmorph, "git": git_hash(), "warmup": h.warmup, "iters": h.iters,
            "quick": a.quick, "command": cmdline, "notes": h.notes}
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump({"meta": meta, "rows": h.records}, f, indent=1)
    if a.append:
        tv = f"torch {torch_v}" if torch_v else "no torch"
        if h.cuda and h.torch is not None:
            tv += f", cuDNN {h.torch.backends.cudnn.version()}"
        sec = [f"\n## Side-by-side vs PyTorch — {meta['date']} — {dev_name} ({tv}, cellmorph {meta['git']})", ""]
        if a.note:
            sec += [a.note, ""]
        sec += [f"`{cmdline}` ({'debug' if is_debug else 'release'} build; device "
                f"`{h.device}`; warmup {h.warmup}, median of {h.iters} iterations per timing, host↔device "
                f"copies excluded on both sides). ratio = our throughput / theirs (> 1: cellmorph faster). "
                + ("Agreement is against PyTorch eager f32 on the same inputs"
                   + (" with TF32 off" if h.cuda else "") + "; VQ codes also against a float64 argmin."
                   if h.torch is not None else "Agreement: against numpy references where there are any."), ""]
        sec.append(md_table(h.records))
        if h.notes:
            sec += [""] + [f"- {n}" for n in h.notes]
        with open(a.append, "a") as f:
            f.write("\n".join(sec) + "\n")
        print(f"appended to {a.append}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
