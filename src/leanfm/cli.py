"""The ``leanfm`` command line. Bad input -> one line on stderr and exit code 2."""
from __future__ import annotations

import argparse
import json
import os
import sys
from importlib import import_module
from pathlib import Path

from .errors import LeanfmError
from .runtimes import GGUF_TYPES  # torch-free

DEFAULT_RECIPES = ["baseline", "rtn-w8", "rtn-w4g64"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse prints usage + message)
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        sys.exit(2)


def _max_tokens(v: str) -> int | None:
    if v.strip().lower() == "all":
        return None
    return _positive(v, "a positive number of tokens or 'all' (for the whole split)")


def _groups(v: str) -> list[str]:
    from .measure.protocol import GROUPS

    groups = [g.strip() for g in v.split(",") if g.strip()]
    if not groups:
        raise argparse.ArgumentTypeError(f"is empty; name one or more metric groups: {','.join(GROUPS)}")
    return groups


def _positive(v: str, expected: str = "a whole number of at least 1") -> int:
    try:
        n = int(v)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {v!r}")
    return n


def _add_protocol(p: argparse.ArgumentParser, quality_only: bool = False) -> None:
    g = p.add_argument_group("measurement protocol")
    g.add_argument("--dataset", default="wikitext2", help="evaluation text: wikitext2, gensim-wiki, or a .txt path")
    g.add_argument("--split", default="test", help="dataset split (wikitext2: test, valid (or validation), train if present locally; other datasets have no splits)")
    g.add_argument("--data-dir", default=None, help="folder holding wikitext-2/{test,valid}.txt; overrides $LEANFM_DATA_DIR; "
                   "$LEANFM_CACHE/data (default ~/.cache/leanfm/data) is searched after")
    g.add_argument("--seqlen", type=int, default=2048, help="tokens per perplexity window (default 2048)")
    g.add_argument("--max-eval-tokens", type=_max_tokens, default=16384, help="evaluate at most this many tokens, or all (default 16384)")
    g.add_argument("--max-fidelity-tokens", type=_max_tokens, default=None,
                   help="compute top1_agreement/kl_to_baseline on the first windows covering this many tokens (default: all evaluated)")
    g.add_argument("--metrics", type=_groups, action="extend", default=None,
                   help="metric groups to measure, comma-separated: quality,speed,memory,energy (default all)")
    g.add_argument("--batch", type=int, default=1, help="decode batch size (default 1)")
    g.add_argument("--prompt", type=int, default=128, help="prompt tokens for the speed test (default 128)")
    g.add_argument("--gen", type=int, default=32, help="decode steps per speed repeat (default 32)")
    g.add_argument("--repeats", type=int, default=10, help="recorded speed repeats (default 10)")
    g.add_argument("--warmup", type=int, default=1, help="unrecorded warm-up repeats (default 1)")
    g.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads, pinned (default: all cores)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch runtime: decode on a static KV cache with a torch.compile'd step (CUDA graphs on a GPU); compile "
                        "time is recorded apart as compile_seconds, and a model the compiled path cannot run decodes eagerly "
                        "with the reason in details.compile_fallback (default --no-compile)")
    g.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="torch runtime: where the model is measured (methods and calibration run on the CPU in fp32; default cpu)")
    g.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="torch runtime: the float dtype the model is measured in (default fp32); refused where the device lacks it")
    v = p.add_argument_group("vision models (family vit, e.g. dinov2-s)")
    v.add_argument("--image-size", type=int, default=224, help="square input side in pixels; a multiple of the patch size (default 224)")
    v.add_argument("--train-per-class", type=int, default=50,
                   help="Fashion-MNIST training images per class for the k-NN and linear probe (default 50)")
    v.add_argument("--test-per-class", type=int, default=20, help="Fashion-MNIST test images per class scored (default 20)")
    d = p.add_argument_group("diffusion models (family diffusion, e.g. terrain-cm)")
    d.add_argument("--steps", type=int, default=4,
                   help="denoising steps per sample, >= 1, unless a recipe's sampling-steps sets its own (default 4)")
    d.add_argument("--samples", type=int, default=32, help="samples (seeds 0..N-1) compared and timed (default 32)")
    g.add_argument("--hardware-profile", default=None, help="hardware profile: a built-in name (see leanfm predict --hardware) or a YAML file with the same keys as the built-in ones (name, kind, memory_gb, memory_bandwidth_gbps, peak_tflops, power_w, usd_per_hour, grid_gco2_per_kwh; default: local)")


def _add_runtime(p: argparse.ArgumentParser) -> None:
    from .runtimes import RUNTIMES

    g = p.add_argument_group("runtime (where the model runs while it is measured)")
    g.add_argument("--runtime", default="torch", choices=RUNTIMES,
                   help="torch: leanfm's own loop; llama.cpp: export each recipe's model to GGUF and measure it in llama.cpp; "
                        "onnxruntime: export to ONNX (int4 in MatMulNBits) and measure it in ONNX Runtime; vllm: on a CUDA GPU "
                        "(default torch)")
    g.add_argument("--type", dest="gguf_type", choices=GGUF_TYPES, default="auto",
                   help="with --runtime llama.cpp: the GGUF type (auto: the block type of the recipe's grid, f32 for a float model)")


def _add_calib(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("calibration (for methods that need it)")
    g.add_argument("--calib-dataset", default="gensim-wiki", help="calibration text (default gensim-wiki)")
    g.add_argument("--calib-samples", type=_positive, default=None,
                   help="number of calibration windows (default: scaled to the job, and printed)")
    g.add_argument("--calib-seqlen", type=_positive, default=None,
                   help="tokens per calibration window (default: scaled to the job, and printed)")


def _protocol(a):
    from .measure.protocol import GROUPS, Protocol

    return Protocol(dataset=a.dataset, split=a.split, data_dir=a.data_dir, seqlen=a.seqlen, max_eval_tokens=a.max_eval_tokens,
                    max_fidelity_tokens=a.max_fidelity_tokens,
                    batch=a.batch, prompt=a.prompt, gen=a.gen, repeats=a.repeats, warmup=a.warmup, threads=a.threads,
                    groups=tuple(a.metrics) if a.metrics else GROUPS, device=a.device, dtype=a.dtype,
                    compile=getattr(a, "compile", False), image_size=getattr(a, "image_size", 224),
                    train_per_class=getattr(a, "train_per_class", 50), test_per_class=getattr(a, "test_per_class", 20),
                    steps=getattr(a, "steps", 4), samples=getattr(a, "samples", 32))


def _calib(a, job_tokens: int | None, why: str):
    """The calibration request: the user's sizes, else sized to ``job_tokens`` (see
    :func:`leanfm.bench.auto_calibration_size`); ``why`` explains the automatic size."""
    from .bench import auto_calibration_size
    from .data.calib import calibration

    n, seqlen = auto_calibration_size(job_tokens)
    auto = a.calib_samples is None and a.calib_seqlen is None
    c = calibration(a.calib_dataset, a.calib_samples or n, a.calib_seqlen or seqlen, data_dir=a.data_dir)
    c.sizing = why if auto else "set by --calib-samples/--calib-seqlen"
    return c


def _add_overwrite(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--overwrite", action="store_true", help=f"replace the {what} already in --out (default: refuse)")


def cmd_models(a) -> int:
    from rich.console import Console
    from rich.table import Table

    from .models.cache import is_cached
    from .models.registry import ALIASES, DEFAULT_MODEL

    t = Table(title="leanfm models (aliases; any local HF directory or hub id also works)")
    for col in ("alias", "model", "family", "params", "license", "installed", "cached fp32", "install"):
        t.add_column(col)
    for s in ALIASES.values():
        inst = s.installed()
        t.add_row(s.alias + (" (default)" if s.alias == DEFAULT_MODEL else ""), s.title, s.family, s.params, s.license,
                  "yes" if inst else "no", "yes" if is_cached(s.alias) else "no", "" if inst else s.install)
    Console(width=200).print(t)
    return 0


_ONLOAD = {"layerwise": "yes, layer by layer with calibration", "per-layer": "yes, one decoder layer at a time",
           "outside": "yes (it changes only modules outside the decoder layers)"}


def methods_markdown() -> str:
    """One section per registered method, generated from the declarations (docs/methods.md)."""
    import inspect

    from .config import PRODUCES, config_class, methods

    out = []
    for m in methods():
        cls = config_class(m)
        d = cls.describe()
        calib = d["needs_calibration"] if isinstance(d["needs_calibration"], str) else ("yes" if d["needs_calibration"] else "no")
        out += [f"## `{m}`", "", d["description"], "",
                f"- config: `leanfm.{d['config']}`; model families: {', '.join(d['families'])}; "
                f"produces: {d['produces']} ({PRODUCES.get(d['produces'], '?')}); "
                f"calibration: {calib}; predictor: {'priced' if d['priced'] else 'not priced'}"
                + (f"; adds metrics: {', '.join(f'`{x}`' for x in d['adds_metrics'])}" if d["adds_metrics"] else ""),
                "- parameters: " + (", ".join(f"`{p['name']}` ({p['type']}, default `{p['default']!r}`)" for p in d["parameters"]) or "none"),
                "- search space: " + ("; ".join(f"`{k}` {v}" for k, v in d["search_space"].items()) or "no"),
                "- onloading (a model larger than memory, one decoder layer at a time): "
                + (_ONLOAD.get(d["onload"], d["onload"]) if d["onload"] else "no (needs the whole model in memory)"),
                ""]
        rest = inspect.cleandoc(cls.__doc__ or "").split("\n\n", 1)
        if len(rest) > 1:
            out += ["```text", rest[1].strip(), "```", ""]
    return "\n".join(out)


def cmd_methods(a) -> int:
    """Every registered method from its declaration (torch-free: nothing is imported to list them)."""
    from .config import config_class, methods

    infos = [config_class(a.name).describe()] if a.name else [config_class(m).describe() for m in methods()]
    if a.markdown:
        print(methods_markdown())
        return 0
    if a.json:
        print(json.dumps(infos if not a.name else infos[0], indent=2, default=str))
        return 0
    from rich.console import Console
    from rich.table import Table

    t = Table(title="leanfm methods (use in a recipe step: {method: NAME, param: value}; details: leanfm methods NAME)")
    for col in ("method", "what it does", "families", "produces", "calibration", "parameters (default)"):
        t.add_column(col, overflow="fold")
    for d in infos:
        params = ", ".join(f"{p['name']}={p['default']!r}" for p in d["parameters"])
        calib = d["needs_calibration"] if isinstance(d["needs_calibration"], str) else ("yes" if d["needs_calibration"] else "no")
        t.add_row(d["method"], d["description"], ", ".join(d["families"]), d["produces"], calib, params)
    Console(width=200).print(t)
    if a.name:
        import inspect

        print(inspect.cleandoc(config_class(a.name).__doc__ or ""))
        if not infos[0]["priced"]:
            print(f"(the predictor cannot price {a.name})")
    return 0


def cmd_bench(a) -> int:
    from .bench import bench
    from .report import print_table, write_report

    from .outdir import default_out

    out = Path(a.out) if a.out else default_out("bench")
    results = bench(a.model, a.recipe or DEFAULT_RECIPES, _protocol(a), out, calib=_calib(a, a.max_eval_tokens, f"scaled to --max-eval-tokens {a.max_eval_tokens or 'all'}"),
                    profile_path=a.hardware_profile, interleave=a.interleave, overwrite=a.overwrite, runtime=a.runtime,
                    gguf_type=a.gguf_type)
    print_table(results)
    report = write_report(results, out)
    print(f"results: {out / 'results.json'}\nreport:  {report}")
    return 0


def cmd_search(a) -> int:
    from .outdir import default_out
    from .search.cli_search import build, render
    from .search.report import write_search_report
    from .search.run import run_search

    a.out = a.out or str(default_out("search"))
    res = run_search(build(a, _protocol(a), a.calib_samples, a.calib_seqlen, a.calib_dataset))
    print(render(res))
    print(f"search: {Path(a.out) / 'search.json'}; Pareto recipes: {Path(a.out) / 'front'}")
    print(f"report: {write_search_report(a.out)}")
    return 0


def cmd_eval(a) -> int:
    from .bench import bench
    from .report import print_table, write_report

    from .outdir import default_out

    from .recipe import Recipe, load_recipe

    label = "as loaded"  # not "baseline": a compressed checkpoint is nobody's reference
    saved = Path(a.model) / "recipe.yaml"
    if saved.is_file():
        try:
            label = f"{load_recipe(str(saved)).name} (checkpoint)"
        except LeanfmError:
            pass
    recipe = Recipe(name=label, description=f"{a.model} measured as stored (no recipe applied)")
    out = Path(a.out) if a.out else default_out("eval")
    protocol = _protocol(a)
    if not {"speed", "energy"} & set(protocol.groups):
        from .allocator import fix_mmap_threshold

        # nothing is timed: freed forward transients go straight back to the OS. With glibc's
        # dynamic threshold the heap kept ~0.5 GB of them during an int4 7B's forward (over 6.15
        # GB, 5.65 GB pinned; docs/benchmarks.md, issue 16). Timed runs keep the default
        # their figures were measured under (a pinned threshold costs page faults per mapping).
        fix_mmap_threshold()
    results = bench(a.model, [recipe], protocol, out, profile_path=a.hardware_profile, overwrite=a.overwrite,
                    baseline_is_reference=False, runtime=a.runtime, gguf_type=a.gguf_type)
    print_table(results)
    print(f"results: {out / 'results.json'}\nreport:  {write_report(results, out)}")
    return 0


def cmd_compress(a) -> int:
    import torch

    from .bench import announce_calibration, check_inputs
    from .models.checkpoint import check_checkpoint_target
    from .models.family import family_of_name
    from .recipe import load_recipe

    family = family_of_name(a.model)
    if family == "diffusion":
        return _compress_denoiser(a)
    if family in ("vit", "clip"):
        return _compress_vision(a, family)
    if family == "diffusion-pipeline":
        return _compress_pipeline(a)
    if family != "causal-lm":
        raise LeanfmError(f"leanfm compress does not write {family} models yet; measure a recipe on {a.model} with leanfm "
                          "bench --model MODEL --recipe NAME, or apply it in Python (leanfm.apply_)")
    recipe = load_recipe(a.recipe)
    out = Path(a.out)
    check_checkpoint_target(out, a.overwrite)  # before any work: nothing is lost to a refused --out
    if a.onload == "always" and a.format != "leanfm":
        raise LeanfmError(_onload_format(a.format))
    from .measure.protocol import check_threads

    check_threads(a.threads)  # at least 1: argparse's _positive
    calib = _calib(a, None, "the GPTQ paper's setting for a checkpoint")
    check_inputs([recipe], calib)
    torch.set_num_threads(a.threads)
    from .allocator import fix_mmap_threshold

    # freed layer transients go back to the OS instead of fragmenting the heap: without it the
    # resident set of an onloaded GPTQ on smollm2-135m grew ~10 MB per layer (peak 0.94 GB vs
    # 0.74 GB pinned, plan 0.70 GB; docs/benchmarks.md, issue 16)
    fix_mmap_threshold()
    from .models.load import load_tokenizer, resolve

    path, source = resolve(a.model)
    tok = load_tokenizer(path)
    announce_calibration([recipe], calib)
    ids = recipe.calibration(calib, tok)[0]  # before the plan: the text and tokens stay in the base it measures
    onload, mem = _memory_plan(a, recipe, calib, path, source)
    extra = {"recipe.yaml": recipe.to_yaml()}
    if onload:
        from .onload_compress import compress_onloaded

        model = compress_onloaded(mem["onloaded"], recipe, ids, out, tok, a.overwrite, extra, activation_budget=mem["activation_budget"])
    else:
        from .api import apply_, load
        from .models.checkpoint import save_checkpoint

        model, tok = load(a.model, tokenizer=tok)
        for step in recipe.steps:
            step.check_model(model)
        apply_(model, recipe, calib=ids)
        save_checkpoint(model, out, tok, a.format, source=f"recipe {recipe.name}", overwrite=a.overwrite,
                        extra_files=extra, gguf_type=a.gguf_type)
    simulated = any(s.get("simulated") for s in model.leanfm_info["steps"])
    size = sum(f.stat().st_size for f in [*out.glob("*.safetensors"), *out.glob("*.gguf")])
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"saved {recipe.name} of {a.model} to {out} ({a.format}, {size / 1e6:.1f} MB of tensors)"
          + (" (simulated: weights are fake-quantized fp32, same size as the original)" if simulated else "")
          + f"; peak RSS {peak / 1e9:.2f} GB (planned {mem['planned'] / 1e9:.2f} GB, {'onloaded' if onload else 'in memory'})")
    return 0


def _start_family_compress(a, family: str, written_as: str):
    """What ``leanfm compress`` on a model that is not a causal LM checks before any work: no
    ``--format`` (``written_as`` says how the family is written), every recipe step of the
    family, a writable ``--out``. Returns ``(recipe, out)``."""
    from .config import check_family
    from .models.checkpoint import check_checkpoint_target
    from .recipe import load_recipe

    if a.format != "leanfm":
        raise LeanfmError(f"{written_as}; --format {a.format} is for causal LMs (drop --format)")
    recipe = load_recipe(a.recipe)
    for step in recipe.steps:
        check_family(step, family)
    out = Path(a.out)
    check_checkpoint_target(out, a.overwrite)
    return recipe, out


def _compress_vision(a, family: str) -> int:
    """``leanfm compress`` on a ViT or an image-text dual encoder: the recipe's weight steps written
    as a checkpoint that ``leanfm.load`` (and ``leanfm bench``) read back: packed int layers in
    leanfm's format, else a plain Hugging Face folder (a dual encoder: each tower so, in its own
    folder). Token reduction (tome, token-prune) changes how the model runs, not its weights: it
    is kept in recipe.yaml and said so, to be applied again after loading."""
    import torch

    from .api import apply_, load
    from .models.checkpoint import partial_folder, save_checkpoint

    recipe, out = _start_family_compress(a, family, f"a {'ViT' if family == 'vit' else 'dual encoder'} is written in "
                                                    "leanfm's own format")
    torch.set_num_threads(a.threads)
    model, tok = load(a.model)
    calib = None
    if any(s.needs_calibration for s in recipe.steps):  # GPTQ, Wanda, SparseGPT: images, as leanfm bench draws them
        from .bench_vision import CALIB_PER_CLASS
        from .data.images import calibration_images

        calib = calibration_images(CALIB_PER_CLASS, int(model.config.image_size), recipe.seed, getattr(a, "data_dir", None))
    apply_(model, recipe, calib=calib)
    from .models.dual_encoder import DualEncoder

    if not isinstance(model, DualEncoder):  # a ViT, a transformers CLIPModel (with its tokenizer): one model folder
        save_checkpoint(model, out, tok, "leanfm", source=f"recipe {recipe.name}", overwrite=a.overwrite,
                        extra_files={"recipe.yaml": recipe.to_yaml()})
    else:
        from .models.dual_encoder import tokenizer_folder

        with partial_folder(out, a.overwrite) as tmp:
            model.save_pretrained(tmp)
            if tok is not None:
                tok.save_pretrained(str(tokenizer_folder(tmp)))
            (Path(tmp) / "recipe.yaml").write_text(recipe.to_yaml())
    runtime = [s.method for s in recipe.steps if s.produces == "token-reduction"]
    size = sum(f.stat().st_size for f in out.rglob("*.safetensors"))
    print(f"saved {recipe.name} of {a.model} to {out} (leanfm, {size / 1e6:.1f} MB of tensors)"
          + (f"; not in the weights: {', '.join(runtime)} (token reduction runs at inference: apply it again after "
             "leanfm.load, see recipe.yaml)" if runtime else ""))
    return 0


def _compress_pipeline(a) -> int:
    """``leanfm compress`` on a diffusers pipeline: its folder as diffusers lays it out, with the
    scheduler the recipe chose (``scheduler/``), a UNet with packed int layers in leanfm's format
    (``unet/``), and the sampling-time steps (step count, DeepCache, ToMe) kept for ``leanfm.load``
    to apply again; a pipeline without packed layers loads in plain diffusers too."""
    import torch

    from .api import apply_, load
    from .models.checkpoint import partial_folder

    recipe, out = _start_family_compress(a, "diffusion-pipeline", "a diffusers pipeline is written as a pipeline folder")
    torch.set_num_threads(a.threads)
    model, _ = load(a.model)
    apply_(model, recipe)
    at_sampling = [s.to_dict() for s in recipe.steps if s.produces in ("sampling-schedule", "feature-cache", "token-merging")]
    with partial_folder(out, a.overwrite) as tmp:
        model.save_pretrained(tmp, runtime_steps=at_sampling)
        (Path(tmp) / "recipe.yaml").write_text(recipe.to_yaml())
    size = sum(f.stat().st_size for f in out.rglob("*.safetensors"))
    kept = f"; applied again at load: {', '.join(s['method'] for s in at_sampling)}" if at_sampling else ""
    print(f"saved {recipe.name} of {a.model} to {out} (diffusers pipeline folder, {size / 1e6:.1f} MB of tensors){kept}")
    return 0


def _compress_denoiser(a) -> int:
    """``leanfm compress`` on a diffusion denoiser: the recipe applied to its ONNX graph and sampler,
    written as a denoiser folder (the .onnx file ONNX Runtime runs, and its config with the step
    count and DeepCache interval) that ``leanfm.load`` and ``leanfm bench`` read back."""
    from .api import apply_, load
    from .models.checkpoint import partial_folder

    recipe, out = _start_family_compress(a, "diffusion", "a diffusion denoiser is written as an ONNX folder")
    model, _ = load(a.model)
    apply_(model, recipe)
    with partial_folder(out, a.overwrite) as tmp:
        model.save_pretrained(tmp)
        (Path(tmp) / "recipe.yaml").write_text(recipe.to_yaml())
    size = sum(f.stat().st_size for f in out.glob("*.onnx"))
    steps = f"{model.steps} step(s) per sample" if model.steps else "the sampler's steps unchanged"
    cache = f"DeepCache every {model.cache_interval} steps" if model.cache_interval else "no DeepCache"
    print(f"saved {recipe.name} of {a.model} to {out} (ONNX denoiser folder, {size / 1e6:.1f} MB graph; {steps}; {cache})")
    return 0


def _memory_plan(a, recipe, calib, path: str, source: str) -> tuple[bool, dict]:
    """Choose in-memory or onloaded, print the memory plan, refuse what does not fit (before any
    work). Returns whether to onload and the plan's numbers."""
    from .onload_compress import unsupported
    from .predict.arch import load_arch
    from .predict.memory_plan import available_bytes, check, current_rss, parse_size, plan

    budget = parse_size(a.max_memory) if a.max_memory else available_bytes()
    budget_name = f"--max-memory {a.max_memory}" if a.max_memory else "memory available now (set --max-memory to choose)"
    arch = load_arch(path if source != "hub" else a.model)
    src_bytes = _source_bytes(path)
    needs = any(s.needs_calibration for s in recipe.steps)
    n, seqlen = (calib.n, calib.seqlen) if needs else (0, 0)
    import transformers.modeling_utils  # noqa: F401 - counted in the base the plan adds to, as the run will hold it

    base = current_rss()
    whole = plan(arch, recipe.steps, n, seqlen, base, onload=False)
    why = unsupported(recipe) or (_onload_format(a.format) if a.format != "leanfm" else None)
    if a.onload == "never" or (a.onload == "auto" and whole.total <= budget):
        p, onload = whole, False
    else:
        if why:
            if a.onload == "always":
                raise LeanfmError(f"--onload always: {why}")
            check(whole, budget, budget_name, n, seqlen, arch, can_onload=False)  # refused with its own numbers
        if source == "hub":
            raise LeanfmError(f"onloading reads a local checkpoint folder; download {a.model} first (or pass its local folder)")
        from .models.onload import Onloaded
        from .onload_compress import deferred_head

        src = Onloaded(path)  # the skeleton and file headers, read once for the plan and the run
        defer = deferred_head(src, recipe) is not None
        p, onload = plan(arch, recipe.steps, n, seqlen, base, onload=True, source_bytes_per_param=src_bytes, defer_head=defer), True
        room = budget - (p.total - p.parts.get("calibration activations", 0))  # what activations may hold in memory
        if p.total > budget:
            least = plan(arch, recipe.steps, n, seqlen, base, onload=True, spill=True, source_bytes_per_param=src_bytes,
                         defer_head=defer)
            if least.total > budget and a.max_memory:
                raise LeanfmError(f"--max-memory {a.max_memory} is below what one decoder layer needs: at least "
                                  f"{least.total / 1e9:.2f} GB ({least.describe().split(': ', 1)[1]}); raise --max-memory")
            p = least
    print(p.describe(), f"(budget {budget / 1e9:.2f} GB: {budget_name})")
    check(p, budget, budget_name, n, seqlen, arch, can_onload=not why)
    act_room = room if onload else None
    return onload, {"path": path, "planned": p.total, "activation_budget": act_room, "onloaded": src if onload else None}


def _onload_format(fmt: str) -> str:
    return (f"--format {fmt} is written from a model in memory; an onloaded compress writes leanfm's format "
            "(compress with --format leanfm, then leanfm export it)")


def _source_bytes(path: str) -> int:
    """Bytes per parameter as stored (config.json's dtype; 4 when it says nothing)."""
    import json

    try:
        cfg = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return 4
    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32")
    return 2 if dtype in ("bfloat16", "float16") else 4


def cmd_export(a) -> int:
    """A checkpoint (or alias) as one file another runtime loads: GGUF for llama.cpp, ONNX for ONNX Runtime."""
    from .api import load
    from .runtimes import export_for

    out = Path(a.out)
    runtime = {"gguf": "llama.cpp", "onnx": "onnxruntime"}[a.format]
    want = ".gguf" if a.format == "gguf" else ".onnx"
    if out.suffix != want:
        raise LeanfmError(f"--out {out} must end in {want} for --format {a.format}")
    if out.exists() and not a.overwrite:
        raise LeanfmError(f"{out} already exists; pass --overwrite to replace it, or choose another --out")
    if a.format != "gguf" and a.gguf_type != "auto":
        raise LeanfmError("--type applies to --format gguf only")
    if a.format == "onnx":
        import importlib.util

        if importlib.util.find_spec("onnx") is None:
            raise LeanfmError("ONNX export needs the onnx package; install it with: pip install 'leanfm[onnx]'")
    model, tok = load(a.model)
    path = export_for(runtime, model, tok, out.with_suffix(""), a.gguf_type)
    if path != out:
        path.replace(out)
    print(f"exported {a.model} to {out} ({a.format}, {out.stat().st_size / 1e6:.1f} MB)")
    return 0


def cmd_recipes(a) -> int:
    """Built-in recipes, parsed from their YAML (torch-free)."""
    from .recipe import builtin_names, load_recipe

    recipes = [load_recipe(n) for n in builtin_names()]
    if a.json:
        print(json.dumps([{**r.to_dict(), "description": r.description} for r in recipes], indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    t = Table(title="leanfm built-in recipes (--recipe NAME; compose with +, e.g. wanda50+gptq-w4g64; or a YAML file)")
    for col in ("recipe", "steps", "description"):
        t.add_column(col, overflow="fold")
    def brief(step) -> str:  # the method and the parameters it sets away from their defaults
        default = type(step)().to_dict()
        return ", ".join([step.method] + [f"{k}={v}" for k, v in step.to_dict().items() if k != "method" and v != default.get(k)])

    for r in recipes:
        steps = "; ".join(brief(st) for st in r.steps)
        t.add_row(r.name, steps or "(none: the unmodified model)", r.description)
    Console(width=200).print(t)
    return 0


def cmd_report(a) -> int:
    from . import results as res
    from .report import print_table, write_report

    if (Path(a.dir) / "search.json").is_file():  # a leanfm search directory
        from .search.cli_search import render
        from .search.report import load, write_search_report

        print(render(load(a.dir)))
        print(f"report: {write_search_report(a.dir)}")
        return 0
    data = res.read(a.dir)
    if data.get("kind") == "loadtest":
        from .report.serving import print_loadtest_table, write_loadtest_report

        print_loadtest_table(data)
        print(f"report: {write_loadtest_report(data, a.dir)}")
        return 0
    print_table(data)
    print(f"report: {write_report(data, a.dir)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .models.registry import DEFAULT_MODEL

    p = _Parser(prog="leanfm", description="Make foundation models resource-efficient and prove it with measurements.")
    import leanfm

    p.add_argument("--version", action="version", version=f"leanfm {leanfm.__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    s = sub.add_parser("models", help="list model aliases, their size, license and install state")
    s.set_defaults(fn=cmd_models)

    s = sub.add_parser("bench", help="apply recipes and measure each against the baseline (the main job)")
    s.add_argument("--model", default=DEFAULT_MODEL, help=f"alias, local HF directory or hub id (default {DEFAULT_MODEL})")
    s.add_argument("--recipe", action="append", help=f"built-in name or YAML path; repeatable (default: {' '.join(DEFAULT_RECIPES)})")
    s.add_argument("--out", default=None, help="output directory (default runs/bench-<timestamp>)")
    _add_overwrite(s, "results")
    s.add_argument("--no-interleave", dest="interleave", action="store_false",
                   help="time each recipe alone right after applying it, instead of all recipes' speed repeats "
                        "interleaved round by round (which keeps every model resident)")
    _add_protocol(s)
    _add_runtime(s)
    _add_calib(s)
    s.set_defaults(fn=cmd_bench)

    s = sub.add_parser("eval", help="measure an existing checkpoint (no recipe applied)")
    s.add_argument("--model", required=True, help="checkpoint directory, alias or hub id")
    s.add_argument("--out", default=None, help="output directory (default runs/eval-<timestamp>)")
    _add_overwrite(s, "results")
    _add_protocol(s)
    _add_runtime(s)
    s.set_defaults(fn=cmd_eval)

    s = sub.add_parser("compress", help="apply a recipe and save a checkpoint (packed quantized layers reload without calibration)")
    s.add_argument("--model", required=True, help="alias, local HF directory or hub id")
    s.add_argument("--recipe", required=True, help="built-in name or YAML path")
    s.add_argument("--out", required=True, help="output directory (written under a temporary name, renamed when complete)")
    _add_overwrite(s, "checkpoint")
    s.add_argument("--max-memory", default=None, help="memory budget for the whole run, e.g. 6GB or 6GiB (default: the memory "
                   "available now); the plan is printed first and a run that would not fit is refused before any work")
    s.add_argument("--onload", choices=["auto", "always", "never"], default="auto",
                   help="keep the checkpoint on disk and bring one decoder layer into memory at a time (auto: when the "
                        "model would not fit in the budget; calibration activations spill to disk when --max-memory "
                        "leaves no room for them)")
    s.add_argument("--format", choices=["leanfm", "compressed-tensors", "gguf"], default="leanfm",
                   help="leanfm: packed layers + leanfm-quant.json (reload with leanfm); compressed-tensors: the "
                        "pack-quantized format vLLM and transformers (with compressed-tensors installed) read; "
                        "gguf: model.gguf for llama.cpp (Llama-family models; packed layers keep their codes)")
    s.add_argument("--type", dest="gguf_type", choices=GGUF_TYPES, default="auto",
                   help="with --format gguf: the GGUF tensor type (auto: the block type the recipe's grid fits, "
                        "f16 for a float model); packed layers must fit it (4-bit symmetric groups of 32: q4_0, "
                        "asymmetric: q4_1, 8-bit symmetric: q8_0)")
    s.add_argument("--threads", type=_positive, default=os.cpu_count() or 1, help="torch threads (default: all cores)")
    s.add_argument("--data-dir", default=None, help="folder holding local datasets; overrides $LEANFM_DATA_DIR; "
                   "$LEANFM_CACHE/data (default ~/.cache/leanfm/data) is searched after")
    _add_calib(s)
    s.set_defaults(fn=cmd_compress)

    s = sub.add_parser("export", help="write a checkpoint (or model alias) as a GGUF for llama.cpp or an ONNX decoder for ONNX Runtime")
    s.add_argument("model", metavar="CKPT", help="checkpoint directory (from leanfm compress), alias or local HF directory")
    s.add_argument("--format", choices=["gguf", "onnx"], required=True,
                   help="gguf: llama.cpp (packed layers keep their codes in Q4_0/Q4_1/Q8_0 blocks); onnx: a decoder with KV cache, "
                        "int4/int8 layers in MatMulNBits")
    s.add_argument("--type", dest="gguf_type", choices=GGUF_TYPES, default="auto",
                   help="with --format gguf: the GGUF type (auto: the block type of the packed layers' grid, f32 for a float model)")
    s.add_argument("--out", required=True, help="the file to write (.gguf or .onnx; written under a temporary name, then renamed)")
    _add_overwrite(s, "file")
    s.set_defaults(fn=cmd_export)

    from .predict import cli_predict

    s = sub.add_parser("predict", help="predict memory, latency, energy and cost of a model x recipe x hardware (no weights needed)")
    cli_predict.add_arguments(s)
    s.set_defaults(fn=cli_predict.run, light=True)

    s = sub.add_parser("hardware", help="list the built-in hardware profiles (name, aliases, memory, bandwidth, TFLOPS, power, $/h, gCO2/kWh)")
    cli_predict.add_hardware_arguments(s)
    s.set_defaults(fn=cli_predict.run_hardware, light=True)

    s = sub.add_parser("methods", help="list registered methods with their parameters, defaults and what they produce")
    s.add_argument("name", nargs="?", default=None, help="one method: its whole declaration")
    s.add_argument("--json", action="store_true", help="print the declarations as JSON")
    s.add_argument("--markdown", action="store_true", help="print the method sections of docs/methods.md")
    s.set_defaults(fn=cmd_methods)

    s = sub.add_parser("recipes", help="list built-in recipes with their steps (use by name in --recipe; join with +)")
    s.add_argument("--json", action="store_true", help="print the recipes as JSON")
    s.set_defaults(fn=cmd_recipes)

    s = sub.add_parser("search", help="search recipes under a budget (predictor-screened, NSGA-II) and return the Pareto set")
    s.add_argument("--model", default=DEFAULT_MODEL, help=f"alias, local HF directory or hub id (default {DEFAULT_MODEL})")
    s.add_argument("--out", default=None, help="output directory (default runs/search-<timestamp>); run the same command "
                   "with the same --out to resume an interrupted search")
    from .search.cli_search import add_arguments as add_search_arguments

    add_search_arguments(s)
    _add_protocol(s)
    _add_calib(s)
    s.set_defaults(fn=cmd_search)

    s = sub.add_parser("tune", help="fine-tune (LoRA, DoRA, QLoRA, full, distillation, MeZO), optionally after a compression "
                       "recipe, and measure quality before and after and what training cost")
    s.add_argument("--model", default=DEFAULT_MODEL, help=f"alias, local HF directory or hub id (default {DEFAULT_MODEL})")
    from .training.cli_tune import add_arguments as add_tune_arguments, run as run_tune

    add_tune_arguments(s)
    s.set_defaults(fn=run_tune)

    s = sub.add_parser("serve", help="run an existing OpenAI-compatible server (transformers serve, llama.cpp's, vLLM) on a "
                       "model after a recipe, until Ctrl-C")
    s.add_argument("--model", default=DEFAULT_MODEL, help=f"alias, local HF directory, hub id or a .gguf file (default {DEFAULT_MODEL})")
    from .serving.cli_serve import add_arguments as add_serve_arguments, run as run_serve

    add_serve_arguments(s)
    s.set_defaults(fn=run_serve)

    s = sub.add_parser("loadtest", help="drive an OpenAI-compatible server on this machine with Poisson arrivals (streaming): "
                       "TTFT, TPOT, ITL, latency percentiles, throughput and goodput per rate")
    from .serving.cli_loadtest import add_arguments as add_loadtest_arguments, run as run_loadtest

    add_loadtest_arguments(s)
    s.set_defaults(fn=run_loadtest)

    s = sub.add_parser("report", help="(re)build report.html from a results directory (leanfm bench/eval or leanfm search)")
    s.add_argument("dir", help="directory holding results.json, or search.json")
    s.set_defaults(fn=cmd_report)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except LeanfmError as e:
        sys.stderr.write(f"leanfm: error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("leanfm: interrupted\n")
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`, which closed early: nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except MemoryError:
        sys.stderr.write("leanfm: error: out of memory; lower --batch/--seqlen/--max-eval-tokens or use a smaller model\n")
        return 2
    except Exception as e:  # noqa: BLE001 - a bug: one line unless debugging
        if os.environ.get("LEANFM_DEBUG"):
            raise
        sys.stderr.write(f"leanfm: internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} (set LEANFM_DEBUG=1 for the traceback)\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
