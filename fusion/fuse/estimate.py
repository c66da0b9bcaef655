"""The cost model of `fusion fuse` (``fusion fuse CONFIG --estimate``): disk for the stage
caches, and memory per GPU for scoring and for training under DDP and FSDP at a world size.

Byte counts follow the cache layout exactly; activation memory is an estimate (a transformer
block's saved activations taken as 10·hidden + 4·intermediate values per token), good to tens
of percent. Parameter counts come from the safetensors headers (the Hub resolver
fetches only those for an estimate), shapes from config.json.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .loss import LOSS_CHUNK
from .models import DTYPE_BYTES, read_config, stored_dtype, weight_info
from .represent import HEAD_CHUNK

GB = 1e9


@dataclass
class Shape:
    """What the cost model needs of one model."""

    name: str
    parameters: int
    largest_layer: int
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    stored: str = "bfloat16"

    @property
    def root(self) -> int:
        """Parameters outside the transformer blocks (embeddings, final norm, output layer)."""
        return max(0, self.parameters - self.layers * self.largest_layer)


def shape_of(folder: Path, name: str) -> Shape:
    config = read_config(folder)
    text = {**config, **(config.get("text_config") or {})}
    info = weight_info(folder)
    hidden = int(text.get("hidden_size") or text.get("n_embd") or 0)
    experts = int(text.get("num_local_experts") or text.get("num_experts") or 1)
    inter = int(text.get("moe_intermediate_size") or text.get("intermediate_size") or 4 * hidden)
    active = int(text.get("num_experts_per_tok") or 1) if experts > 1 else 1
    return Shape(name, info.parameters, info.largest_layer, int(text.get("num_hidden_layers") or len(info.per_layer)),
                 hidden, inter * active, int(text.get("vocab_size") or 0), stored_dtype(folder) or "bfloat16")


@dataclass
class Recipe:
    sequences: int
    tokens: float  # mean tokens per sequence (at most max_length)
    top_k: int = 10
    max_length: int = 2048
    score_batch: int = 8
    store_bytes: int = 2
    batch: int = 4  # sequences per process per micro-step
    train_dtype: str = "bfloat16"
    checkpointing: bool = True
    world: int = 8
    gpu_memory: float = 80 * GB
    fusion_function: str = "min_ce"
    notes: list[str] = field(default_factory=list)

    @property
    def positions(self) -> float:
        return self.sequences * self.tokens


def representation_bytes(r: Recipe) -> float:
    # input_ids 4, response 1, offsets 8, top-k ids 4 and logits store_bytes each; 12 per sequence
    return r.positions * (13 + r.top_k * (4 + r.store_bytes)) + 12 * r.sequences


def target_bytes(r: Recipe) -> float:
    """Alignment chunks (rows, status, pair tables taken as 15% of positions) and fused targets
    (m entries per position: k under min_ce, 2k when a fusion function mixes)."""
    m = r.top_k if r.fusion_function == "min_ce" else 2 * r.top_k
    return r.positions * (5 + 0.15 * 48 + m * (4 + r.store_bytes)) + 8 * r.sequences


def scoring_gpus(s: Shape, r: Recipe, dtype_bytes: int = 2) -> int:
    need = s.parameters * dtype_bytes + scoring_activations(s, r, dtype_bytes)
    return max(1, -(-int(need) // int(0.8 * r.gpu_memory)))


def scoring_activations(s: Shape, r: Recipe, dtype_bytes: int = 2) -> float:
    tokens = r.score_batch * r.max_length
    return tokens * (s.hidden * dtype_bytes * 2 + (4 * s.hidden + 2 * s.intermediate) * dtype_bytes) \
        + HEAD_CHUNK * s.vocab * (dtype_bytes + 8)


def training_memory(s: Shape, r: Recipe, strategy: str) -> dict[str, float]:
    """Per GPU: the float32 weights, gradients and AdamW state (16 bytes a parameter), sharded
    over the world under FSDP; the gathered compute copies FSDP adds; activations; the loss."""
    c = DTYPE_BYTES[r.train_dtype]
    tokens = r.batch * r.max_length
    block = (10 * s.hidden + 4 * s.intermediate) * tokens * c  # one block's saved activations
    if r.checkpointing:
        activations = s.layers * tokens * s.hidden * c + block
    else:
        activations = s.layers * block
    loss = LOSS_CHUNK * s.vocab * 4 * 3 + tokens * s.hidden * 4
    if strategy == "ddp":
        state = 16 * s.parameters
        gathered = 0.0
    else:
        state = 16 * s.parameters / r.world
        # two blocks in flight (the one computing and the prefetched one) and the root's full
        # parameters and gradients while the step runs
        gathered = (2 * s.largest_layer + s.root) * c + s.root * 4
    total = state + gathered + activations + loss
    return {"state": state, "gathered": gathered, "activations": activations, "loss": loss, "total": total}


def render(pivot: Shape, sources: list[Shape], r: Recipe) -> str:
    def gb(x: float) -> str:
        for unit, size in (("TB", 1e12), ("GB", GB), ("MB", 1e6)):
            if x >= size:
                return f"{x / size:,.1f} {unit}"
        return f"{x / 1e3:,.1f} kB"

    def count(n: int) -> str:
        return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.1f}M"

    reps = representation_bytes(r)
    targets = target_bytes(r)
    lines = [f"fusion fuse --estimate: {r.sequences:,} sequences × {r.tokens:,.0f} tokens on average "
             f"({r.positions:.3g} positions), {r.world} process(es), {gb(r.gpu_memory)} per GPU", "",
             f"representations (disk; top-{r.top_k}, {8 * r.store_bytes}-bit logits) and scoring (bf16)",
             f"  {'model':<28} {'params':>8} {'disk':>10} {'GPUs/copy':>10} {'copies':>7}"]
    for s in [pivot] + sources:
        g = scoring_gpus(s, r)
        lines.append(f"  {s.name:<28} {count(s.parameters):>8} {gb(reps):>10} {g:>10} {max(1, r.world // g):>7}")
    lines += [f"  {'alignment + fused targets':<28} {'':>8} {gb(targets):>10}   per source",
              f"  {'total':<28} {'':>8} {gb(reps * (1 + len(sources)) + targets * len(sources)):>10}", ""]
    lines.append(f"training the pivot (per GPU; micro-batch {r.batch} × {r.max_length} tokens, {r.train_dtype}, "
                 f"gradient checkpointing {'on' if r.checkpointing else 'off'})")
    lines.append(f"  {'':<16} {'weights+grads+AdamW':>20} {'gathered':>10} {'activations':>12} {'loss':>8} "
                 f"{'total':>10}")
    for strategy, label in (("ddp", "DDP"), ("fsdp", f"FSDP over {r.world}")):
        m = training_memory(pivot, r, strategy)
        fits = "fits" if m["total"] <= 0.9 * r.gpu_memory else "does not fit"
        lines.append(f"  {label:<16} {gb(m['state']):>20} {gb(m['gathered']):>10} {gb(m['activations']):>12} "
                     f"{gb(m['loss']):>8} {gb(m['total']):>10}  {fits}")
    lines.append(f"  host memory while FSDP shards the pivot: {gb(4 * pivot.parameters)} per process")
    flops = 2 * r.positions * sum(s.parameters for s in [pivot] + sources)
    train = 6 * r.positions * pivot.parameters * len(sources)
    lines += ["", f"compute: scoring {flops:.3g} FLOPs, training {train:.3g} FLOPs per epoch (all targets)"]
    lines += [f"note: {n}" for n in r.notes]
    return "\n".join(lines)


def measure_data(path: Path, tokenizer, max_length: int, sample: int = 1000) -> tuple[int, float, str]:
    """(sequences, mean tokens per sequence capped at max_length, how it was measured)."""
    from .data import load_examples

    examples = load_examples(path, tokenizer)
    picked = examples[:: max(1, len(examples) // sample)][:sample]
    if tokenizer is not None:
        from .data import encode

        mean = sum(len(encode(tokenizer, e, max_length)[0]) for e in picked) / max(1, len(picked))
        return len(examples), mean, f"tokens counted with the pivot's tokenizer on {len(picked)} sequences"
    mean = sum(min(max_length, len(e.text) / 4) for e in picked) / max(1, len(picked))
    return len(examples), mean, "no pivot tokenizer here: tokens taken as characters / 4"


def estimate_config(config_path: str | Path, *, world_size: int | None = None, gpu_memory: int | None = None,
                    offline: bool = False, cache_dir: str | None = None) -> str:
    """The estimate for a fuse config: models resolved for their headers only."""
    from ..api.resolver import ResolveOptions
    from ..resolve import resolve
    from .config import load_fuse_config
    from .models import gpu_memory as local_gpus
    from .models import load_tokenizer
    from .parallel import world

    config = load_fuse_config(config_path)
    options = ResolveOptions(base_dir=config.base_dir, offline=offline, cache_dir=cache_dir, weights=False)
    refs = [("pivot", config.pivot)] + [(f"sources[{i}].model", r) for i, r in enumerate(config.sources)]
    resolved = [resolve(ref, options, where) for where, ref in refs]
    shapes = [shape_of(m.folder, f"{m.where.removesuffix('.model')} {Path(m.reference).name}") for m in resolved]
    tokenizer = None
    if (resolved[0].folder / "tokenizer.json").is_file():
        tokenizer = load_tokenizer(resolved[0].folder, "pivot")
    cfg, tcfg = config.representations, config.training
    sequences, tokens, how = measure_data(config.data, tokenizer, cfg.max_length)
    sequences = round(sequences * (1 - (config.eval_fraction if config.eval_data is None else 0)))
    found = local_gpus()
    recipe = Recipe(sequences, tokens, cfg.top_k, cfg.max_length, cfg.batch_size,
                    2 if cfg.store_dtype == "float16" else 4, tcfg.batch_size, tcfg.dtype,
                    tcfg.gradient_checkpointing, world_size or world()[1],
                    float(gpu_memory or (found[0] if found else 80 * GB)), config.fusion_function, [how])
    if gpu_memory is None and not found:
        recipe.notes.append("no GPU here: planned for 80 GB GPUs (--gpu-memory sets it)")
    return render(shapes[0], shapes[1:], recipe)


def estimate_json(pivot: Shape, sources: list[Shape], r: Recipe) -> str:
    """The numbers :func:`render` prints, machine-readable."""
    return json.dumps({
        "representations_bytes_per_model": representation_bytes(r), "targets_bytes_per_source": target_bytes(r),
        "scoring_gpus": {s.name: scoring_gpus(s, r) for s in [pivot] + sources},
        "training": {k: training_memory(pivot, r, k) for k in ("ddp", "fsdp")}}, indent=2)
