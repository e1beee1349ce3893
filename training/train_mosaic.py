"""Train the second bundled LLaVA (issue 11) on the easy-VQA mosaic task, resumably, on a CPU.

The recipe is the bundled model's four stages (:mod:`training.train`), carried over to
2x2 mosaics (:mod:`qvlm.data.mosaic`):

1. **vision**: the vision tower with linear shape/colour heads on every patch token, each token
   labelled with *its own cell's* label (a 128 px mosaic in 16 px patches is an 8x8 grid; each
   cell is a 4x4 block of it); each cell is flipped/turned/shifted on its own (answer-preserving).
2. **captions**: the language model alone, every image token replaced by ``E[colour] + E[shape]``
   (+ ``E[row] + E[column]`` of its cell, :class:`_Captions`): the mosaic as a grid of words in the
   LLM's own space. The language model starts from random weights and grows by **progressive
   stacking** (Gong et al., ICML 2019; ``caption_start_layers``, ``caption_stack_at``): 2 decoder
   layers train, are copied on top of themselves, and so on, 2 -> 4 -> 8 -> 16. The first steps
   follow a **template curriculum** (``caption_curriculum``): position questions alone, then with
   comparisons, then with counts, then every type. Why, measured (``benchmarks/results/
   mosaic_designs.md``): in the full mixture a language model answers the yes/no types from the
   captions long before it learns to pick a cell by its place, and then never does (41% on position
   questions with the first bundled model's language model as the seed, run v4, 75.97% overall);
   a 2-layer model given position questions first learns them in a few hundred steps, keeps them
   as the other types come in, and stacking preserves what the shallow model knew. With this
   recipe (run v5) the shipped model answers 84.4% of position questions and 84.44% overall.
3. **projector**: only the projector, on the answer loss plus the relative squared error to
   those caption tokens.
4. **joint**: everything, with the heads as an auxiliary loss and a small pull to the captions.

Every step draws fresh mosaics from the seeded generator; state (weights, heads, optimizer,
scheduler, both random generators) is checkpointed to ``OUT/checkpoints/step-N`` (a loadable
LLaVA folder plus ``trainer_state.pt``), so ``--resume`` continues exactly where a run stopped.
``OUT/train.log`` gets one line per ``log_every`` steps. Run in the background with::

    nohup python -m training mosaic --out assets/tiny-llava-mosaic > /dev/null 2>&1 &
    tail -f assets/tiny-llava-mosaic/train.log

Cost (measured 2026-11-26 on the 2-core machine, run v5, ``--threads 2`` on otherwise idle cores):
the defaults (9,000 + 11,000 + 200 + 1,500 steps) took 3,911 s: vision 18.8 min (0.12 s a step of
16 mosaics), captions 35.3 min (0.05 s a step of 4 mosaics x 8 questions at 2 and 4 decoder layers,
0.18 s at 8, 0.34 s at 16), align 0.9 min, joint 10 min (0.39 s). Each mosaic's ~67-token prefix
(``<s> user :`` + 64 image tokens) runs once, its key/value cache shared by the mosaic's questions
(:func:`shared_prefix_answer_loss`: same loss and gradients, 3.1x faster than running every question
in full). Beside another process two threads spin at their barriers and steps got 10-20x slower:
use ``--threads 1`` when the machine is shared (a step is then ~1.6x slower than with two idle cores).
``--device cuda`` trains on a GPU with the same recipe and initial weights (not the same bits); on a
lent H100 running four designs at once, steps took about as long as on the CPU, so it buys parallel
designs, not speed, at this size.

Gate before the full run (issue 11). A probe is one flag away: ``--max-minutes 20`` stops with a
checkpoint (rerun with ``--resume`` to continue). A checkpoint folder is a loadable LLaVA that names
its task (``training_report.json``), so the CLI calibrates and scores it on mosaics::

    python -m qvlm eval --model RUN --limit 500
    python -m qvlm diagnose --model RUN --bits W4A3,W4A4 --samples 16 [--fp-vision] --out FILE

Pass: interaction share >= 10% in at least a quarter of the adjacent pairs, joint != greedy in some
block. Every design tried so far, with its accuracy and gate numbers, is in
``benchmarks/results/mosaic_designs.md``: run v5 (these defaults) is the first above 80% and ships
as ``assets/tiny-llava-mosaic``; none passed the gate.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from transformers import LlavaForConditionalGeneration

from qvlm.data import COLORS, SHAPES
from qvlm.data.mosaic import CELL_SIZE, MOSAIC_SIZE, labelled_pool, mosaic_evaluation_subset, mosaic_words, \
    sample_training_mosaic, templates_of
from training.tiny_llava import TinyLlavaSpec, build_model, build_processor, build_tokenizer, vocabulary_words
# The bundled recipe's step helpers, shared: one encoding of questions and one answer-token loss for both models.
from training.train import (
    AttributeHeads,
    answer_loss,
    answer_token_loss,
    encode_questions,
    lr_lambda,
    QuestionTable,
    relative_sq_error,
    vision_patch_features,
    augment,
)

TASK = "mosaic"
STAGES = ("vision", "caption", "align", "joint")

# 16 decoder layers of 192 (gated MLP 512: the bundled model's layer shape, so its language model can
# seed this one), CLIP 6x192 at 128 px in 16 px patches: 64 image tokens.
MOSAIC_SPEC = TinyLlavaSpec(
    image_size=MOSAIC_SIZE, patch_size=16,
    vision_hidden=192, vision_layers=6, vision_heads=6, vision_intermediate=768,
    text_hidden=192, text_layers=16, text_heads=6, text_intermediate=512,
    max_positions=256, vision_feature_layer=-2,
)
SMOKE_SPEC = TinyLlavaSpec(
    image_size=MOSAIC_SIZE, patch_size=32,
    vision_hidden=32, vision_layers=2, vision_heads=2, vision_intermediate=64,
    text_hidden=32, text_layers=2, text_heads=2, text_intermediate=64,
    max_positions=128, vision_feature_layer=-2,
)


def build_mosaic_tokenizer():
    """The bundled model's word-level tokenizer and chat template, with the mosaic words added."""
    return build_tokenizer(sorted(set(vocabulary_words()) | set(mosaic_words())))


def fp16_megabytes(model) -> float:
    return sum(p.numel() for p in model.parameters()) * 2 / 1e6


@dataclass
class MosaicTrainConfig:
    """Every knob of the run; saved as ``OUT/training_config.json`` and read back by ``--resume``."""

    spec: TinyLlavaSpec = field(default_factory=lambda: MOSAIC_SPEC)
    seed: int = 0
    vision_steps: int = 9000  # 3,000 left cell shape at 66% on test mosaics (colour 99%)
    vision_batch: int = 16  # mosaics per step (64 cell images)
    vision_lr: float = 2e-3
    caption_steps: int = 11000  # 2 decoder layers to step 3,000, 4 to 5,000, 8 to 7,000, then 16
    caption_lr: float = 1e-3
    caption_start_layers: int | None = 2  # progressive stacking; None trains every layer from the start
    caption_stack_at: tuple[int, ...] = (3000, 5000, 7000)  # caption steps after which the depth doubles
    caption_places: bool = True  # captions name each cell's place (top/bottom + left/right), see _Captions
    # a LLaVA folder ("bundled": the first model) whose language model seeds this one; None: random weights.
    # The seeded recipe (run v4) never learned position questions (41%); see the module docstring.
    language_init: str | None = None
    # ((last step, question types), ...): the caption stage's first steps ask only these types; later steps all
    caption_curriculum: tuple[tuple[int, tuple[str, ...]], ...] = (
        (600, ("position",)), (1200, ("position", "compare")), (1800, ("position", "compare", "count")))
    align_steps: int = 200
    align_lr: float = 2e-3
    align_weight: float = 1.0
    joint_steps: int = 1500
    joint_lr: float = 5e-4
    joint_vision_lr: float = 2e-4
    joint_align_weight: float = 0.1
    aux_weight: float = 0.5
    images_per_step: int = 4  # mosaics per step in stages 2-4
    questions_per_mosaic: int = 8  # the first with a balanced answer, the rest about the same mosaic
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05
    max_steps: int | None = None  # cap on every stage (smoke runs)
    eval_questions: int = 500
    checkpoint_every: int = 250
    keep_checkpoints: int = 2
    log_every: int = 25
    max_minutes: float | None = None  # stop with a checkpoint after this long (a design probe)
    threads: int | None = None
    device: str = "cpu"  # "cuda" trains on a GPU: same recipe and initial weights, not the same bits

    RUN_CONTROL = ("max_minutes", "threads", "eval_questions", "checkpoint_every", "log_every", "device")

    def __post_init__(self) -> None:
        self.caption_stack_at = tuple(self.caption_stack_at)
        self.caption_curriculum = tuple((int(last), tuple(types)) for last, types in self.caption_curriculum)
        for _, types in self.caption_curriculum:
            templates_of(types)  # refuses unknown question types now, not mid-run
        if [last for last, _ in self.caption_curriculum] != sorted({last for last, _ in self.caption_curriculum}):
            raise ValueError("caption_curriculum's last steps must increase")
        if self.caption_start_layers is not None:
            final = self.caption_start_layers * 2 ** len(self.caption_stack_at)
            if final != self.spec.text_layers:
                raise ValueError(f"progressive stacking from {self.caption_start_layers} layers doubled "
                                 f"{len(self.caption_stack_at)} times gives {final}, not {self.spec.text_layers}")

    def caption_depth(self, step: int) -> int:
        """Decoder layers the caption stage trains at its ``step`` (1-based)."""
        if self.caption_start_layers is None:
            return self.spec.text_layers
        return self.caption_start_layers * 2 ** sum(step > s for s in self.caption_stack_at)

    def caption_question_types(self, step: int) -> tuple[str, ...] | None:
        """Question types the caption stage asks at its ``step`` (1-based); None: every type."""
        return next((types for last, types in self.caption_curriculum if step <= last), None)

    def stage_steps(self, stage: str) -> int:
        steps = getattr(self, f"{stage}_steps")
        return min(steps, self.max_steps) if self.max_steps else steps

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "MosaicTrainConfig":
        names = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names and k != "spec"}
        return cls(spec=TinyLlavaSpec(**data["spec"]), **kwargs)


def parse_curriculum(text: str) -> tuple[tuple[int, tuple[str, ...]], ...]:
    """``'600=position;1200=position,compare'`` -> ((600, ("position",)), (1200, ("position", "compare")))."""
    phases = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        last, sep, types = part.partition("=")
        if not sep or not last.strip().isdigit():
            raise ValueError(f"curriculum phase {part!r} is not LAST_STEP=type,type (e.g. 600=position)")
        phases.append((int(last), tuple(t.strip() for t in types.split(",") if t.strip())))
    return tuple(phases)


def cell_of_token(spec: TinyLlavaSpec) -> torch.Tensor:
    """[image tokens]: the mosaic cell (0-3, row-major) each patch token lies in."""
    grid = spec.image_size // spec.patch_size
    if grid % 2:
        raise ValueError(f"a {spec.image_size} px mosaic needs an even patch grid, got {grid}x{grid}")
    rows, cols = torch.arange(grid).repeat_interleave(grid), torch.arange(grid).repeat(grid)
    return (rows // (grid // 2)) * 2 + cols // (grid // 2)


@lru_cache(maxsize=1)
def _cell_pixel_table() -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """(image ids, [N, 3, 64, 64] CLIP-normalised pixels, [N, 2] labels) of every labelled train image.

    The 64 px processor normalises exactly as the 128 px one: a mosaic of these equals the
    processed mosaic image (tested), so mosaics are composed in tensor space, each cell augmented.
    """
    from qvlm.data import load_image

    pool = labelled_pool("train")
    ids = sorted(pool.labels)
    cell_processor = build_processor(replace(MOSAIC_SPEC, image_size=CELL_SIZE), build_tokenizer([])).image_processor
    chunks = [cell_processor([load_image("train", i) for i in ids[s : s + 256]], return_tensors="pt")["pixel_values"]
              for s in range(0, len(ids), 256)]
    return ids, torch.cat(chunks), torch.tensor([pool.labels[i] for i in ids])


class CellPixels:
    """Normalised pixels of every labelled train image, composed into mosaics per step."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.ids, pixels, labels = _cell_pixel_table()
        self.pixels, self.labels = pixels.to(device), labels.to(device)
        self.row = {image_id: k for k, image_id in enumerate(self.ids)}

    def mosaics(self, cells: list[tuple[int, ...]], gen: torch.Generator | None) -> torch.Tensor:
        """[B, 3, 128, 128]; each cell augmented on its own when ``gen`` is given."""
        rows = torch.tensor([[self.row[i] for i in c] for c in cells])  # [B, 4]
        px = self.pixels[rows.flatten()]
        if gen is not None:
            px = augment(px, gen)
        px = px.view(len(cells), 2, 2, 3, CELL_SIZE, CELL_SIZE)
        return px.permute(0, 3, 1, 4, 2, 5).reshape(len(cells), 3, MOSAIC_SIZE, MOSAIC_SIZE)

    def token_labels(self, cells: list[tuple[int, ...]], token_cell: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, T] shape, [B, T] colour) labels of each image token's cell."""
        rows = torch.tensor([[self.row[i] for i in c] for c in cells])
        per_cell = self.labels[rows]  # [B, 4, 2]
        per_token = per_cell[:, token_cell]  # [B, T, 2]
        return per_token[..., 0], per_token[..., 1]


def _heads_loss(heads: AttributeHeads, feats: torch.Tensor, shape_y: torch.Tensor, color_y: torch.Tensor):
    """Cross-entropy of the per-token heads against each token's own cell label."""
    shape_logits, color_logits = heads(feats)
    return F.cross_entropy(shape_logits.flatten(0, 1), shape_y.flatten()) + F.cross_entropy(
        color_logits.flatten(0, 1), color_y.flatten())


class _Captions:
    """``E[colour] + E[shape]`` of each token's cell, plus ``E[row] + E[column]`` of the cell
    (``top``/``bottom``, ``left``/``right``) when ``token_cell`` is given: [B, T, hidden].

    Why the cell's place: a cell's 16 tokens are not contiguous in the sequence (row-major 8x8
    grid: four runs of four, interleaved with the neighbour cell's), so "the shape in the top left"
    asks the language model for a periodic positional pattern through RoPE; with the place words
    in the caption it is the same content match as "is there a red shape?". The vision tower
    knows each patch's place (its position embeddings), so the projector can produce them.
    Measured: not enough - with or without them, and with one image token per cell, the seeded
    language model answered 41-53% of position questions (``benchmarks/results/mosaic_designs.md``).
    """

    def __init__(self, tokenizer, token_cell: torch.Tensor | None = None) -> None:
        self.color_ids = torch.tensor(tokenizer.convert_tokens_to_ids(list(COLORS)))
        self.shape_ids = torch.tensor(tokenizer.convert_tokens_to_ids(list(SHAPES)))
        self.place_ids = None
        if token_cell is not None:
            row = torch.tensor(tokenizer.convert_tokens_to_ids(["top", "bottom"]))[token_cell // 2]
            column = torch.tensor(tokenizer.convert_tokens_to_ids(["left", "right"]))[token_cell % 2]
            self.place_ids = torch.stack([row, column])  # [2, T]

    def to(self, device: torch.device) -> "_Captions":
        self.color_ids, self.shape_ids = self.color_ids.to(device), self.shape_ids.to(device)
        if self.place_ids is not None:
            self.place_ids = self.place_ids.to(device)
        return self

    def __call__(self, model, shape_y: torch.Tensor, color_y: torch.Tensor) -> torch.Tensor:
        emb = model.get_input_embeddings()
        caption = emb(self.color_ids[color_y]) + emb(self.shape_ids[shape_y])
        if self.place_ids is not None:
            caption = caption + emb(self.place_ids).sum(0)
        return caption


def shared_prefix_answer_loss(model, table: QuestionTable, image_embeds: torch.Tensor, questions: list[list],
                              pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`training.train.answer_loss`, computing each mosaic's shared prefix once.

    Every question of a mosaic starts with the same ``<s> user :`` + image tokens (~67 of ~90
    tokens). The prefix runs once per mosaic with a key/value cache; the cache is repeated for the
    mosaic's questions and only their suffixes (question, answer: ~23 tokens) run on it, so the
    language model sees ~2.9x fewer tokens per step. Gradients flow through the cache, so loss and
    gradients equal ``answer_loss``'s (tested).
    """
    rows, owners, starts = encode_questions(table, questions)
    first_image = rows[0].index(table.image_token_id)
    cut = first_image + table.image_tokens  # prefix length: everything up to the last image token
    prefix = rows[0][:cut]
    if any(r[:cut] != prefix for r in rows):
        raise ValueError("questions of a step must share the prompt prefix before the question text")
    lm, embed = model.model.language_model, model.get_input_embeddings()
    prefix_embeds = embed(torch.tensor(prefix)).unsqueeze(0).repeat(len(questions), 1, 1)
    prefix_embeds[:, first_image:cut] = image_embeds
    cache = lm(inputs_embeds=prefix_embeds, use_cache=True).cache
    cache.batch_select_indices(torch.tensor(owners))  # one cache row per question (differentiable gather)
    suffixes = [r[cut:] for r in rows]
    length = max(len(r) for r in suffixes)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), cut + length), dtype=torch.long)
    mask[:, :cut] = 1
    for i, r in enumerate(suffixes):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, cut : cut + len(r)] = 1
    hidden = lm(inputs_embeds=embed(ids), attention_mask=mask, cache=cache,
                position_ids=torch.arange(cut, cut + length).expand(len(rows), -1)).last_hidden_state
    return answer_token_loss(model, hidden, rows, starts, offset=cut)


@contextmanager
def decoder_depth(model, layers: int):
    """Run the language model's first ``layers`` decoder layers only (forward passes inside the block)."""
    lm = model.model.language_model
    full = lm.layers
    if layers < len(full):
        lm.layers = torch.nn.ModuleList(list(full)[:layers])
    try:
        yield
    finally:
        lm.layers = full


def stack_decoder_layers(model, depth: int) -> None:
    """Progressive stacking: decoder layers ``depth .. 2*depth-1`` become copies of ``0 .. depth-1``."""
    layers = model.model.language_model.layers
    for i in range(depth):
        layers[depth + i].load_state_dict(layers[i].state_dict())


def init_language_model(model, tokenizer, source: str | Path) -> str:
    """Copy ``source``'s language model into ``model``'s first decoder layers; returns a log line.

    Decoder layers and the final norm are copied as they are; the input embeddings and the output
    head row by row for every word both tokenizers hold (the mosaic words the source never saw keep
    their random rows). Layer shapes must match.
    """
    from transformers import AutoTokenizer

    from qvlm.models import BUNDLED_MODEL_DIR

    folder = BUNDLED_MODEL_DIR if source == "bundled" else Path(source)
    src = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    src_tokenizer = AutoTokenizer.from_pretrained(folder)
    src_lm, lm = src.model.language_model, model.model.language_model
    if len(src_lm.layers) > len(lm.layers) or src.config.text_config.hidden_size != model.config.text_config.hidden_size:
        raise ValueError(f"{folder}'s language model ({len(src_lm.layers)} layers of "
                         f"{src.config.text_config.hidden_size}) does not fit this model's")
    for layer, src_layer in zip(lm.layers, src_lm.layers):
        layer.load_state_dict(src_layer.state_dict())
    lm.norm.load_state_dict(src_lm.norm.state_dict())
    src_vocab = src_tokenizer.get_vocab()
    shared = [(i, src_vocab[w]) for w, i in tokenizer.get_vocab().items() if w in src_vocab]
    rows, src_rows = torch.tensor([i for i, _ in shared]), torch.tensor([j for _, j in shared])
    with torch.no_grad():
        for ours, theirs in ((model.get_input_embeddings().weight, src.get_input_embeddings().weight),
                             (model.lm_head.weight, src.lm_head.weight)):
            ours[rows.to(ours.device)] = theirs[src_rows.to(theirs.device)].to(ours.device)
    return (f"language model initialised from {folder.name}: {len(src_lm.layers)} decoder layers, "
            f"{len(shared)} of {len(tokenizer.get_vocab())} word rows")


class _Log:
    """Lines to stdout and to ``OUT/train.log`` (appended: a resumed run continues the same file)."""

    def __init__(self, path: Path, echo: Callable[[str], None] | None = print) -> None:
        self.path, self.echo = path, echo

    def __call__(self, message: str) -> None:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}"
        with self.path.open("a") as f:
            f.write(line + "\n")
        if self.echo:
            self.echo(line)


def latest_checkpoint(out: Path) -> Path | None:
    steps = sorted((int(p.name.split("-")[1]), p) for p in (out / "checkpoints").glob("step-*")
                   if (p / "trainer_state.pt").exists())
    return steps[-1][1] if steps else None


def train_mosaic_llava(out_dir: str | Path, config: MosaicTrainConfig | None = None, resume: bool = False,
                       echo: Callable[[str], None] | None = print) -> dict:
    """Train (or with ``resume`` continue) the mosaic LLaVA into ``out_dir``; returns the report.

    Stops early, with a checkpoint, after ``config.max_minutes``; the report then says ``stopped``.
    """
    out = Path(out_dir)
    checkpoint = latest_checkpoint(out) if out.exists() else None
    if checkpoint is not None and not resume:
        raise ValueError(f"{out} already holds checkpoints; pass --resume to continue or choose another --out")
    if resume and checkpoint is not None:
        saved = MosaicTrainConfig.from_dict(json.loads((out / "training_config.json").read_text()))
        given = config or MosaicTrainConfig()
        cfg = replace(saved, **{k: getattr(given, k) for k in MosaicTrainConfig.RUN_CONTROL})
    else:
        cfg = config or MosaicTrainConfig()
    out.mkdir(parents=True, exist_ok=True)
    (out / "checkpoints").mkdir(exist_ok=True)
    (out / "checkpoints" / ".gitignore").write_text("*\n")  # checkpoints never go into git
    (out / "training_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    from qvlm.models.device import resolve_device

    device = resolve_device(cfg.device)
    with torch.device("cpu"):  # initial weights drawn on the CPU: the same on every device
        run = _MosaicRun(out, cfg, _Log(out / "train.log", echo), device)
    with torch.device(device):  # every tensor the steps create lands beside the model
        return run.run(checkpoint)


class _MosaicRun:
    """One training process: builds or restores the state, runs the remaining stages, checkpoints."""

    def __init__(self, out: Path, cfg: MosaicTrainConfig, log: _Log,
                 device: torch.device = torch.device("cpu")) -> None:
        self.out, self.cfg, self.log, self.device = out, cfg, log, device
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.tokenizer = build_mosaic_tokenizer()
        self.processor = build_processor(cfg.spec, self.tokenizer)
        self.model = build_model(cfg.spec, self.tokenizer, seed=cfg.seed)
        torch.manual_seed(cfg.seed)
        self.heads = AttributeHeads(cfg.spec.vision_hidden)
        self.rng = random.Random(cfg.seed)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.token_cell = cell_of_token(cfg.spec)
        self.table = QuestionTable(self.processor, cfg.spec.image_tokens)
        self.captions = _Captions(self.tokenizer, self.token_cell if cfg.caption_places else None)
        self.depth = cfg.spec.text_layers  # decoder layers the current step runs (fewer early in the caption stage)
        self.question_types: tuple[str, ...] | None = None  # the caption curriculum's types at this step
        self.started = time.perf_counter()
        self.elapsed_before = 0.0
        self.report: dict = {"task": TASK}

    # ---- state ---------------------------------------------------------------------------------
    def _groups(self, stage: str) -> list[dict]:
        """The optimizer's parameter groups of a stage (fixes which parts train)."""
        m, cfg = self.model, self.cfg
        projector = list(m.model.multi_modal_projector.parameters())
        vision = list(m.model.vision_tower.parameters())
        taken = {id(p) for p in projector + vision}
        language = [p for p in m.parameters() if id(p) not in taken]
        heads = list(self.heads.parameters())
        groups = {
            "vision": [{"params": vision + heads, "lr": cfg.vision_lr}],
            "caption": [{"params": language, "lr": cfg.caption_lr}],
            "align": [{"params": projector, "lr": cfg.align_lr}],
            "joint": [{"params": language + projector, "lr": cfg.joint_lr},
                      {"params": vision + heads, "lr": cfg.joint_vision_lr}],
        }[stage]
        training = {id(p) for g in groups for p in g["params"]}
        for p in [*m.parameters(), *heads]:
            p.requires_grad_(id(p) in training)
        return groups

    def _save_checkpoint(self, stage: str, step: int, global_step: int, opt, sched) -> Path:
        path = self.out / "checkpoints" / f"step-{global_step}"
        self.model.save_pretrained(path)
        self.processor.save_pretrained(path)
        # names its task, so eval/diagnose/quantize on a checkpoint calibrate and score on mosaics
        (path / "training_report.json").write_text(json.dumps(self.report, indent=2, default=str))
        torch.save({"stage": stage, "step": step, "global_step": global_step, "heads": self.heads.state_dict(),
                    "opt": opt.state_dict(), "sched": sched.state_dict(), "rng": self.rng.getstate(),
                    "gen": self.gen.get_state(), "elapsed": self._elapsed(), "report": self.report},
                   path / "trainer_state.pt")
        old = sorted((int(p.name.split("-")[1]), p) for p in (self.out / "checkpoints").glob("step-*"))
        for _, p in old[: -self.cfg.keep_checkpoints]:
            shutil.rmtree(p)
        self.log(f"checkpoint {path.name} ({stage} step {step})")
        return path

    def _restore(self, checkpoint: Path) -> dict:
        self.model = LlavaForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32)
        state = torch.load(checkpoint / "trainer_state.pt", weights_only=False, map_location="cpu")
        self.heads.load_state_dict(state["heads"])
        self.rng.setstate(state["rng"])
        self.gen.set_state(state["gen"])
        self.elapsed_before = state["elapsed"]
        self.report = state["report"]
        self.log(f"resumed from {checkpoint.name}: {state['stage']} step {state['step']}")
        return state

    def _elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    # ---- steps ---------------------------------------------------------------------------------
    def _mosaics(self, n: int) -> list[list]:
        return [sample_training_mosaic(self.rng, self.cfg.questions_per_mosaic, question_types=self.question_types)
                for _ in range(n)]

    def _step(self, stage: str, pixels: CellPixels):
        """(loss, questions, per-question correctness or None) of one step of ``stage``."""
        cfg, m = self.cfg, self.model
        if stage == "vision":
            cells = [sample_training_mosaic(self.rng, 1)[0].cells for _ in range(cfg.vision_batch)]
            shape_y, color_y = pixels.token_labels(cells, self.token_cell)
            feats = vision_patch_features(m, pixels.mosaics(cells, self.gen))
            return _heads_loss(self.heads, feats, shape_y, color_y), [], None
        qs = self._mosaics(cfg.images_per_step)
        cells = [q[0].cells for q in qs]
        shape_y, color_y = pixels.token_labels(cells, self.token_cell)
        pad = self.tokenizer.pad_token_id
        if stage == "caption":
            with decoder_depth(m, self.depth):
                loss, ok = shared_prefix_answer_loss(m, self.table, self.captions(m, shape_y, color_y), qs, pad)
            return loss, qs, ok
        if stage == "align":
            with torch.no_grad():
                feats = vision_patch_features(m, pixels.mosaics(cells, self.gen))
                target = self.captions(m, shape_y, color_y)
            tokens = m.model.multi_modal_projector(feats)
            loss, ok = shared_prefix_answer_loss(m, self.table, tokens, qs, pad)
            return loss + cfg.align_weight * relative_sq_error(tokens, target), qs, ok
        feats = vision_patch_features(m, pixels.mosaics(cells, self.gen))
        tokens = m.model.multi_modal_projector(feats)
        loss, ok = shared_prefix_answer_loss(m, self.table, tokens, qs, pad)
        loss = loss + cfg.aux_weight * _heads_loss(self.heads, feats, shape_y, color_y)
        if cfg.joint_align_weight:
            with torch.no_grad():
                target = self.captions(m, shape_y, color_y)
            loss = loss + cfg.joint_align_weight * relative_sq_error(tokens, target)
        return loss, qs, ok

    # ---- the run -------------------------------------------------------------------------------
    def run(self, checkpoint: Path | None) -> dict:
        cfg = self.cfg
        state = self._restore(checkpoint) if checkpoint is not None else None
        self.model.to(self.device)
        self.heads.to(self.device)
        self.token_cell = self.token_cell.to(self.device)
        self.captions.to(self.device)
        if state is None:
            n_params = sum(p.numel() for p in self.model.parameters())
            self.report.update(parameters=n_params, fp16_mb=round(fp16_megabytes(self.model), 2),
                               image_tokens=cfg.spec.image_tokens)
            self.log(f"model: {n_params:,} parameters ({self.report['fp16_mb']} MB in FP16), "
                     f"{cfg.spec.text_layers} decoder layers of {cfg.spec.text_hidden}, "
                     f"{cfg.spec.image_tokens} image tokens; stages {[cfg.stage_steps(s) for s in STAGES]} steps")
        pixels = CellPixels(self.device)
        global_step = state["global_step"] if state else 0
        first = STAGES.index(state["stage"]) if state else 0
        self.model.train()
        for stage in STAGES[first:]:
            total = cfg.stage_steps(stage)
            done = state["step"] if state and state["stage"] == stage else 0
            if done >= total:
                continue
            groups = self._groups(stage)
            params = [p for g in groups for p in g["params"]]
            opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total, cfg.warmup_fraction))
            if done:
                opt.load_state_dict(state["opt"])
                sched.load_state_dict(state["sched"])
            elif stage == "caption" and cfg.language_init:
                self.log("caption: " + init_language_model(self.model, self.tokenizer, cfg.language_init))
            tally, losses, t_window = Counter(), [], time.perf_counter()
            for step in range(done + 1, total + 1):
                self.depth = cfg.caption_depth(step) if stage == "caption" else cfg.spec.text_layers
                self.question_types = cfg.caption_question_types(step) if stage == "caption" else None
                if stage == "caption" and cfg.caption_start_layers and step - 1 in cfg.caption_stack_at:
                    stack_decoder_layers(self.model, self.depth // 2)
                    self.log(f"caption: stacked the {self.depth // 2} trained decoder layers, now {self.depth}")
                loss, qs, ok = self._step(stage, pixels)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                global_step += 1
                losses.append(loss.item())
                for q, right in zip((q for mq in qs for q in mq), ok.tolist() if ok is not None else []):
                    tally[q.question_type, "n"] += 1
                    tally[q.question_type, "ok"] += right
                if step % cfg.log_every == 0 or step == total:
                    per_step = (time.perf_counter() - t_window) / len(losses)
                    accs = " ".join(f"{t}={tally[t, 'ok'] / tally[t, 'n']:.2f}"
                                    for t in sorted({t for t, _ in tally}))
                    depth = f" depth {self.depth}" if self.depth < cfg.spec.text_layers else ""
                    self.log(f"{stage} {step}/{total}{depth} loss {sum(losses) / len(losses):.4f} {accs} "
                             f"{per_step:.2f} s/step, stage ETA {per_step * (total - step) / 60:.1f} min")
                    tally, losses, t_window = Counter(), [], time.perf_counter()
                out_of_time = cfg.max_minutes is not None and time.perf_counter() - self.started > 60 * cfg.max_minutes
                if step == total or global_step % cfg.checkpoint_every == 0 or out_of_time:
                    self._save_checkpoint(stage, step, global_step, opt, sched)
                if out_of_time:
                    self.report["stopped"] = f"time budget of {cfg.max_minutes} min, at {stage} step {step}"
                    self.log(f"stopped: {self.report['stopped']}; continue with --resume")
                    return self._finish(final=False)
            if stage == "vision":
                self.report["vision_cell_accuracy_test"] = self._cell_accuracy()
                self.log(f"vision: test cell accuracy {self.report['vision_cell_accuracy_test']}")
            if stage in ("align", "joint"):
                self.report[f"{stage}_test_accuracy"] = self._answer_accuracy()
                self.log(f"{stage}: teacher-forced test accuracy {self.report[f'{stage}_test_accuracy']}")
        return self._finish(final=True)

    def _finish(self, final: bool) -> dict:
        self.report["train_seconds"] = round(self._elapsed(), 1)
        if final:
            self.report.pop("stopped", None)
            self.model.eval()
            self.model.to(torch.float16).save_pretrained(self.out)
            self.model.to(torch.float32)
            self.processor.save_pretrained(self.out)
            self.log(f"saved the FP16 model to {self.out} after {self.report['train_seconds']} s")
        (self.out / "training_report.json").write_text(json.dumps(self.report, indent=2, default=str))
        return self.report

    # ---- quick measurements (teacher-forced, on fixed test subsets) --------------------------------
    @torch.no_grad()
    def _test_pixels(self, samples) -> torch.Tensor:
        images = [s.load_image() for s in samples]
        return self.processor.image_processor(images, return_tensors="pt")["pixel_values"].to(self.device)

    @torch.no_grad()
    def _cell_accuracy(self) -> dict[str, float]:
        samples = mosaic_evaluation_subset(min(self.cfg.eval_questions, 256), seed=2)
        pool = labelled_pool("test")
        feats = vision_patch_features(self.model, self._test_pixels(samples))
        shape_logits, color_logits = self.heads(feats)
        onehot = F.one_hot(self.token_cell, 4).float()  # [T, 4]: sum each cell's token logits
        shape_pred = torch.einsum("btk,tc->bck", shape_logits, onehot).argmax(-1)
        color_pred = torch.einsum("btk,tc->bck", color_logits, onehot).argmax(-1)
        cell_labels = torch.tensor([pool.cell_labels(s.cells) for s in samples])  # [B, 4, 2]
        return {"shape": round((shape_pred == cell_labels[..., 0]).float().mean().item(), 4),
                "color": round((color_pred == cell_labels[..., 1]).float().mean().item(), 4)}

    @torch.no_grad()
    def _answer_accuracy(self) -> dict[str, float]:
        """First-answer-token accuracy, overall and per type, on a fixed test subset (eval uses generate)."""
        self.model.eval()
        samples = mosaic_evaluation_subset(self.cfg.eval_questions, seed=1)
        right, seen = Counter(), Counter()
        for start in range(0, len(samples), 64):
            chunk = samples[start : start + 64]
            tokens = self.model.model.multi_modal_projector(
                vision_patch_features(self.model, self._test_pixels(chunk)))
            _, ok = answer_loss(self.model, self.table, tokens, [[s] for s in chunk], self.tokenizer.pad_token_id)
            for s, r in zip(chunk, ok.tolist()):
                right[s.question_type] += r
                seen[s.question_type] += 1
        self.model.train()
        out = {"all": round(sum(right.values()) / max(1, len(samples)), 4)}
        out.update({t: round(right[t] / seen[t], 4) for t in sorted(seen)})
        return out

