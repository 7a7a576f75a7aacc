"""The weights folder's README.md: a Hugging Face model card written from the folder's own files.

    python -m training.model_card [--weights weights] [--repo user/name]

Every number comes from config.json (architecture, training facts), metrics.json
and metrics.md (scores, written by training.evaluate) and history.png; nothing is
hard-coded, so the card always describes the weights beside it. training.push
writes it before each upload.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from huggingface_hub import EvalResult, ModelCardData

from captioner.vocabulary import SPECIAL_TOKENS
from captioner.weights import CONFIG_FILE, read_folder
from training.evaluate import markdown_table

CARD_FILE = "README.md"
TAGS = ["image-captioning", "keras", "lstm", "glove", "flickr8k"]
# coco-caption metric names (training.evaluate.COCO_METRICS) -> the Hub's metric ids.
HUB_METRIC_IDS = {"BLEU-1": "bleu", "BLEU-2": "bleu", "BLEU-3": "bleu", "BLEU-4": "bleu",
                  "METEOR": "meteor", "ROUGE-L": "rouge", "CIDEr": "cider"}
PLACEHOLDER_REPO = "user/name"

# Labels for the training facts train.py records in config.json; unknown keys are shown as they are.
TRAINING_LABELS = {
    "dataset": "Dataset",
    "train_images": "Training images",
    "train_sequences": "Training captions (mirrored copies included)",
    "mirrored_images": "Mirrored training images too",
    "vocabulary_min_count": "Vocabulary: words seen more than N times",
    "epochs_run": "Epochs run",
    "early_stopping": "Early stopping on",
    "best_epoch": "Best epoch (kept)",
    "dev_scores_at_best_epoch": "Dev scores at the best epoch",
    "batch_size": "Batch size (captions)",
    "optimizer": "Optimizer",
    "seed": "Seed",
    "train_seconds": "Training time (s)",
}


def write_model_card(weights_dir: str | Path, repo_id: str | None = None) -> Path:
    """Write `weights_dir/README.md` and return its path. The folder must pass read_folder's checks."""
    weights_dir = Path(weights_dir)
    folder = read_folder(weights_dir)
    content = json.loads((weights_dir / CONFIG_FILE).read_text())
    metrics = folder.metrics
    metrics_md = weights_dir / "metrics.md"
    card_data = ModelCardData(
        library_name="keras",
        license="mit",
        language="en",
        pipeline_tag="image-to-text",
        tags=TAGS,
        metrics=sorted(set(HUB_METRIC_IDS.values())),
        model_name=repo_id or "merge-cnn-lstm-captioner",
        eval_results=eval_results(metrics) or None,
    )
    body = "\n".join(
        [
            f"# {repo_id or 'Merge CNN-LSTM image captioner'}",
            "",
            describe(folder.config, folder.encoder_weights, content.get("training", {}).get("dataset", "Flickr8k")),
            architecture_section(folder.config, folder.encoder_weights),
            training_section(content.get("training", {}), (weights_dir / "history.png").is_file()),
            scores_section(metrics, metrics_md.read_text() if metrics_md.is_file() else None),
            usage_section(repo_id or PLACEHOLDER_REPO),
            limitations_section(folder.config),
        ]
    )
    path = weights_dir / CARD_FILE
    path.write_text(f"---\n{card_data.to_yaml()}\n---\n\n{body}")
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
            dataset_type="flickr8k",
            dataset_name="Flickr8k",
            dataset_split=metrics["split"],
            metric_type=HUB_METRIC_IDS[name],
            metric_name=name,
            metric_value=round(value, 4),
            metric_config=best,  # the decoding setting: greedy, beam3, beam5
        )
        for name, value in metrics["results"][best].items()
        if name in HUB_METRIC_IDS
    ]


def describe(config, encoder_weights: str, dataset: str) -> str:
    text = (
        "An image captioner in the *merge* style: a frozen ImageNet CNN "
        f"(`{config.encoder}`) encodes the photo, an LSTM over frozen GloVe word vectors reads the caption so far, "
        f"and the two are added to predict the next word. Trained on {dataset}; it writes short English captions.\n"
    )
    if encoder_weights != "imagenet":
        text += (
            f"\n> **Note:** these weights were trained on features of a `{config.encoder}` with **{encoder_weights}** "
            "(not ImageNet) weights. They exercise the pipeline; they are not a useful captioner.\n"
        )
    return text


def architecture_section(config, encoder_weights: str) -> str:
    special = ", ".join(f"`{token}`" for token in SPECIAL_TOKENS)  # in backticks, or markdown hides them as HTML tags
    rows = [
        ("Image encoder", f"`{config.encoder}` (keras.applications, {encoder_weights} weights, global average pooling, frozen)"),
        ("Image feature size", config.feature_dim),
        ("Image branch", f"Dropout({config.dropout}) -> Dense({config.units}, relu)"),
        ("Word embedding", f"{config.embedding_dim}-d GloVe 6B, frozen"),
        ("Text branch", f"Dropout({config.dropout}) -> LSTM({config.units})"),
        ("Decoder", f"add -> Dense({config.units}, relu) -> Dense({config.vocab_size}, softmax)"),
        ("Vocabulary", f"{config.vocab_size} ids, {len(SPECIAL_TOKENS)} of them special: {special}"),
        ("Longest caption", f"{config.max_length} tokens, start and end included"),
    ]
    return "## Architecture\n\n" + table(rows) + (
        "\nThe repo holds only the caption model (`decoder.weights.h5`, Keras arrays, no pickled code), its "
        "vocabulary (`vocab.json`) and `config.json` (with SHA-256 checksums of both, checked on load). The encoder's "
        "ImageNet weights come from `keras.applications`.\n"
    )


def training_section(facts: dict, has_plot: bool) -> str:
    text = "## Training\n\n"
    if facts:
        text += table([(TRAINING_LABELS.get(key, key), fact_text(value)) for key, value in facts.items()])
        text += (
            "\nLoss: cross-entropy on the next word at every position of each caption (teacher forcing). Training "
            "stops once the dev split stops improving, and keeps the best epoch's weights.\n"
        )
    else:
        text += "config.json records no training facts.\n"
    if has_plot:
        text += "\n![history](history.png)\n"
    return text


def fact_text(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{key} {fact_text(v)}" for key, v in value.items())
    return str(value)


def scores_section(metrics: dict | None, metrics_md: str | None) -> str:
    """metrics.md as evaluate wrote it, else the same table rebuilt from metrics.json."""
    if metrics is None and metrics_md is None:
        return "## Evaluation\n\nNot evaluated yet (`python -m training.evaluate` writes the scores).\n"
    text = "## Evaluation\n\n"
    if metrics:
        text += (
            f"Scores on the Flickr8k {metrics['split']} split ({metrics['images']} images, 5 reference captions each), "
            f"computed with {metrics.get('toolkit', 'pycocoevalcap')} for greedy and beam-search decoding; "
            f"the model-index above reports the best setting ({metrics['best']}).\n\n"
        )
    return text + (metrics_md if metrics_md is not None else markdown_table(metrics))


def usage_section(repo_id: str) -> str:
    return f"""## How to use

With this project's `captioner` package:

```python
from captioner import Captioner

captioner = Captioner.from_pretrained("{repo_id}", revision="main")  # pin a commit sha for reproducible results
print(captioner.caption("photo.jpg").text)
print(captioner.caption("photo.jpg", method="beam", beam_width=5).text)
```

From the command line, or as the demo app's model:

```bash
python -m captioner photo.jpg --repo {repo_id} --method beam
CAPTIONER_REPO={repo_id} CAPTIONER_REVISION=<commit sha> python app.py
```
"""


def limitations_section(config) -> str:
    return f"""## Limitations

- **Domain.** Flickr8k is about 8,000 everyday photos, mostly of people and dogs, outdoors. Other subjects get captions
  built from that world (a cat may become a dog; a chart may become "a man ...").
- **Small vocabulary.** It can only use the {config.vocab_size - len(SPECIAL_TOKENS)} words frequent in its training captions.
- **English only**, short and generic captions; the model can state things that are not in the image.
- **Data.** The Flickr8k images and captions are for research use under their own terms; this repository contains
  neither, only weights trained on them. Captions can carry the biases of the crowd-sourced annotations.
"""


def table(rows) -> str:
    return "| | |\n|---|---|\n" + "".join(f"| {label} | {value} |\n" for label, value in rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=Path("weights"))
    parser.add_argument("--repo", help="the Hub repo id the card names in its examples")
    args = parser.parse_args(argv)
    print(f"wrote {write_model_card(args.weights, args.repo)}")


if __name__ == "__main__":
    main()
