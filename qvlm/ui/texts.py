"""The words of the app: titles and the "what am I looking at" text of each panel.

Kept apart from the layout so a teacher can edit the explanations without touching code
that builds components, and so the tests can check every panel has one.
"""

from __future__ import annotations

from qvlm.export import BITSANDBYTES, COMPRESSED_TENSORS, FORMAT_NAME, W4A16_NOTE

PAPER = (
    "Wang, Wang, Xu, Tang, Zhou, Lu. *Q-VLM: Post-training Quantization for Large Vision-Language Models.* "
    "NeurIPS 2024. [arXiv:2410.08119](https://arxiv.org/abs/2410.08119)"
)

TITLE = "# Q-VLM Studio"
SUBTITLE = (
    "Quantize a LLaVA-style vision-language model with **Q-VLM** (post-training quantization), look inside the "
    "algorithm, and ask the full-precision and the quantized model the same question. Runs on a CPU. "
    f"Paper: {PAPER}."
)

QUANTIZE_HELP = """
**What am I looking at?** *Quantization* stores a network's numbers with fewer bits. **W4A4** means the
weights (W) and the activations (A, the numbers flowing between layers) are rounded to 4 bits: only 16
possible values per tensor instead of 65,536 in FP16. Weights are known in advance, but activations depend on
the input, so each layer needs a *clipping range*: values outside it are cut off, values inside are rounded to
one of the 16 levels. Too wide a range wastes levels, too narrow clips outliers. W4A4 is hard because both
errors are large and they **add up from layer to layer**.

Q-VLM chooses each decoder layer's range (a percentile *p* of its activations) not layer by layer but
**jointly within blocks** of neighbouring layers that depend on each other strongly (*CDM*, cross-layer
dependency mining), and it also tunes the vision encoder's quantizers so the language model receives easier
activations (*VEO*, visual encoder optimization). The recipes `qvlm-cdm` and `qvlm-veo` are its two halves
(the paper's ablations); `rtn`, `qlora` and `awq` are baselines. Calibration uses a few image–question pairs
from the *train* split of the model's own task (easy-VQA, or mosaics for the mosaic model). — {paper}
""".format(paper=PAPER)

ANALYSIS_HELP = """
**What am I looking at?** Each view below shows one part of how the chosen variant was made, or measures it on
request. Each has its own **How to read it** box; its first line (in bold) says what this variant's numbers mean.
— {paper}
""".format(paper=PAPER)

PARTITION_HELP = """
The **block partition** shows how Q-VLM grouped the decoder layers. For each pair of neighbouring layers it
measures **D(k,k+1)**, the *conditional entropy* of layer k+1's quantized activations given layer k's (Eq. 4): how
much uncertainty is left about the next layer's rounding once you know this layer's. A high value means the two
layers' rounding errors are entangled, so their clipping ranges should be chosen together. Neighbours whose average
D is above the threshold **h0** (red dashed line) join one **block** (at most *max block depth* layers), and all
ranges in a block are searched jointly to minimize the block's output error (Eq. 3). Hover a layer to see the
percentile *p* it got.
"""

DED_HELP = """
The **DED** (discretization error difference) is how much output error the joint search saves over the
layer-by-layer search, per calibration sample. The paper's Fig. 2 shows DED grows almost linearly with the
entropy (R² = 0.97 on LLaVA): that is why the cheap entropy is a good guide for the expensive joint search. The
right-hand plot repeats this with the plain quantization error as the proxy (App. A: a weaker 0.81). On this tiny
model with a handful of samples, expect a noisier picture. Each R² is shown with its **chance level**: the R² that
pure noise exceeds one time in twenty with that many samples.
"""

INTERACTION_HELP = """
**Do the layers interact?** measures every pair of neighbouring decoder layers: how much of the block's error over
the grid of range choices is *not* the sum of the two layers' own errors (the **interaction share**; below the 10%
dashed line they simply add up, so choosing ranges layer by layer is as good as choosing them jointly), whether the
joint search picks anything else, how much of the error the ranges control at all, and how strongly the first
layer passes an incoming error on (**gain**). The verdict above the table says in words what these numbers mean for
this model.
"""

ERRORS_HELP = """
The **per-layer error** is each layer's output error against the FP model on the calibration pairs, with the
quantized model's own input (so an error made below is carried up): where the variant loses, layer by layer, next to
the other variants of the same model.
"""

VEO_HELP = """
The **VEO loss** is what visual-encoder optimization (Eqs. 8-10) minimized while it trained the vision tower's
activation ranges: the answer loss, the Jacobian-weighted entropy and the output error, drawn weighted so that they
add up to the total. The held-out line is the same error on train images VEO never saw; the epoch with the lowest
one is kept, so VEO never leaves the vision tower worse on unseen images than the layer-wise init left it.
"""

MODALITY_NOTE = ("*The FP model of the Quantize tab's model: |x| at every decoder layer's input, image tokens and "
                 "text tokens apart.*")
MODALITY_HELP = """
Image tokens and text tokens reach the LLM with different magnitudes; where one is far larger, a range fitted to
both wastes levels on the other.
"""

VISION_SITES_NOTE = ("*The chosen variant with only one vision site's activation quantizers on at a time (weights "
                     "as quantized), against the FP model's image tokens.*")
VISION_SITES_HELP = """
The bar of a site is the image-token error its activation rounding adds alone; the map
below shows one site's |x| with the ranges it was quantized with.
"""

ASK_HELP = """
**What am I looking at?** The same image and question go to the **full-precision (FP)** model and to every
quantized variant you hold; the answers appear side by side with their latency. A good quantization gives the
same answers. The bundled model is a tiny LLaVA trained on **easy-VQA** (one coloured shape per 64x64 image), so ask
about shape and colour: *what shape is in the image?*, *is there a red shape?*. The bundled **mosaic** model
(16 decoder layers, 84% on its test split) was trained on 2x2 grids of easy-VQA images: ask it how many
shapes of a kind there are, what is in a corner, whether two shapes match; the example images and questions follow the model you pick. Quantized weights
are held packed (4 bits really take half a byte) and unpacked in every forward pass, while activations are
fake-quantized in float arithmetic as in the paper's own code, so latency shows the cost of that simulation, not
the speed-up of real 4-bit kernels.

**Token by token** feeds every model the FP model's answer (teacher forcing), so step j of every model predicts the
same token: the table lists each model's five most likely next tokens, **KL(FP‖variant)** measures in nats how far
the variant's belief moved from FP's at that step (0 = identical), and a red cell marks the first step where the
variant's top token is not FP's. **Flipped** means the variant's own answer differs from FP's. The
**disagreement finder** asks many test questions and lists those where an answer flipped, then those where the
probability of the right answer fell most; click one to ask it here. — {paper}
""".format(paper=PAPER)

RESULTS_HELP = """
**What am I looking at?** Accuracy on a fixed random subset of the *test* split of the model's own task (the same
questions for every model): easy-VQA for the bundled model, mosaics for the mosaic model. Overall and per question type
(yes/no, colour, shape for easy-VQA; count, position, compare, exists, negation for mosaics), for the FP model and each
variant you hold; the
*quantized* column says which parts each variant quantized (the vision-tower and projector switches
of the Quantize tab), so the cost of quantizing the vision tower is one row against another. The memory plot compares the weights' size in FP16 with their size when packed at the variant's bit-width
(the paper reports 2.78x less memory for LLaVA-13B at W4A4). Larger subsets give steadier numbers but take longer:
about 100 questions a second for the bundled model on 2 CPU cores.

**Accuracy vs bit-width** quantizes the model once per chosen recipe and bit-width and scores each on the same
test questions, with FP as a dashed line. Below it, in its own panel, the paper's LLaVA-1.5-7B numbers (Table 3):
another model on other datasets, for the shape of the curve only. — {paper}
""".format(paper=PAPER)

TASK_LABELS = {"easy-vqa": "easy-VQA", "mosaic": "mosaic"}
"""How titles and statuses name each task of :data:`qvlm.data.TASKS`."""

TASK_HINTS = {
    "easy-vqa": "The task here is easy-VQA (one coloured shape per image), which the bundled model was trained on; "
                "its {n} answers are: {answers}. Ask about the shape or its colour.",
    "mosaic": "The task here is the mosaic task (a 2x2 grid of easy-VQA shapes), which this model was trained on; "
              "its {n} answers are: {answers}. Ask how many shapes of a kind there are, what colour or shape is in "
              "a corner, whether two shapes match, or whether one is (not) there.",
}
"""What the model knows, said next to its answers when a question falls outside its task (so an off-task question gets a reason, not just a wrong answer)."""

PAPER_TABLE_NOTE = (
    "These are the paper's numbers for **LLaVA-v1.5-7B** on **ScienceQA (SQA), VizWiz and VQA v2**, copied from "
    "{source}. They are **not** measured by this app and **not** the "
    "same task as the sweep above: another model (7B parameters, not the bundled tiny LLaVA) on other datasets. "
    "Read them for the shape of the curve, not for a comparison of values. The paper's Table 3 has only FP, W6A6 "
    "and W4A4 (AWQ, QLoRA and Q-VLM); it gives no W8A8, W4A3 or W3A3 numbers, so none are shown."
)

FOOTER = (
    f"<small>{PAPER}. Q-VLM Studio runs on CPU; quantized weights are stored packed for real, activations are "
    "fake-quantized, as in the paper's released code.</small>"
)

NO_VARIANT_NOTE = (
    "No quantized variant yet: only the full-precision answer is shown. "
    "Quantize a model in the **Quantize** tab to compare."
)

EXPORT_FORMATS = {
    FORMAT_NAME: "Q-VLM packed: bit-exact reload with qvlm (load_quantized, or this app's model picker)",
    COMPRESSED_TENSORS: "compressed-tensors: transformers / vLLM load it; weights only (uniform, not NF4), "
                        "activation ranges in a sidecar JSON",
    BITSANDBYTES: "bitsandbytes: transformers loads NF4 Linear4bit layers; weights only (NF4 variants), W4A16",
}
"""The Download group's format menu: one line per :data:`qvlm.export.SAVE_FORMATS` entry (a format not
listed here is shown by its name)."""

EXPORT_RELOAD = {
    FORMAT_NAME: "Unzip, then `qvlm.load_quantized(folder)` (or put the folder under an allowed model folder and "
                 "pick it in **Model**): it answers bit for bit like the variant here.",
    COMPRESSED_TENSORS: "Unzip, then `LlavaForConditionalGeneration.from_pretrained(folder)` (transformers with the "
                        "`compressed-tensors` package). It holds the packed codes after loading and decompresses every "
                        "Linear on its first forward call (the two byte counts above). Dynamic per-token activations "
                        "(the Deployable preset) are applied by the loader; static ranges are not (they are in "
                        "`qvlm_activations.json`), so such a W4A4 variant answers as its W4A16 counterpart.",
    BITSANDBYTES: "Unzip, then `LlavaForConditionalGeneration.from_pretrained(folder)` (transformers with "
                  f"`bitsandbytes` and `accelerate`, CPU or GPU). {W4A16_NOTE}; the activation ranges are in "
                  "`qvlm_activations.json`.",
}
"""What to do with a downloaded zip, shown under its size."""

DOWNLOAD_HELP = (
    "**Download** the latest quantized variant of this session as a zip in the chosen format, with the run's JSON "
    "(its config, what the run measured, and any easy-VQA evaluation from the **Results** tab)."
)

DOWNLOAD_FORMAT_INFO = "The formats the latest variant can be written in."

NO_VARIANT_TO_DOWNLOAD = "There is no quantized variant to download yet: run a quantization above first."
