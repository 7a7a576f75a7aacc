"""Step 6: publish a weights folder as a Hugging Face Hub model repo.

    python -m training.push --weights weights --repo user/name [--private] [--message M]

Checks the folder (checksums) first, writes its model card (README.md), creates
the repo if needed and uploads the weights files in one commit. Prints the
commit id: pin it with CAPTIONER_REVISION so the app keeps serving exactly
these weights after later pushes. Needs a token with write access
(`hf auth login`, or HF_TOKEN).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import httpx2  # huggingface_hub 2.x's HTTP client: its TransportError is a network failure
from huggingface_hub import CommitInfo, HfApi, get_token
from huggingface_hub.errors import HFValidationError, HfHubHTTPError
from huggingface_hub.utils import validate_repo_id

from captioner.weights import BUNDLED_WEIGHTS, FOLDER_FILES, WeightsError, read_folder
from training.model_card import write_model_card


class PushError(RuntimeError):
    """The push can't be done; the message says why and what to do."""


def push(weights: Path, repo_id: str, private: bool = False, message: str | None = None) -> CommitInfo:
    """Check `weights`, write its model card and upload it to `repo_id`; returns the commit."""
    if repo_id.count("/") != 1:  # Captioner.from_pretrained only takes "user/name" repo ids
        raise PushError(f"'{repo_id}' is not a valid Hub repo id: it must have the form 'user/name'.")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise PushError(f"'{repo_id}' is not a valid Hub repo id: {exc}") from None
    try:
        folder = read_folder(weights)
    except WeightsError as exc:
        raise PushError(f"Refusing to push {weights}: {exc}") from None
    if get_token() is None:
        raise PushError(
            "No Hugging Face token found. Log in with `hf auth login` or set HF_TOKEN to a token with write access "
            "(https://huggingface.co/settings/tokens)."
        )
    if folder.encoder_weights != "imagenet":
        print(f"warning: {weights} was trained on {folder.encoder_weights} encoder weights; it is not a useful captioner.",
              file=sys.stderr)
    write_model_card(weights, repo_id)
    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        return api.upload_folder(
            folder_path=weights,
            repo_id=repo_id,
            repo_type="model",
            allow_patterns=FOLDER_FILES,  # never training's work files or caption dumps
            commit_message=message or f"Upload {folder.config.encoder} captioner weights",
        )
    except HfHubHTTPError as exc:
        # 401: bad token; 403: no write access to that namespace; 404/409: wrong repo id. The server says which.
        raise PushError(f"The Hub refused the push to {repo_id}: {exc}") from None
    except httpx2.TransportError as exc:
        raise PushError(
            f"Can't reach the Hugging Face Hub ({exc}); the upload did not complete. Check the network and push again."
        ) from None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=BUNDLED_WEIGHTS, help="the weights folder (default: the bundled weights/)")
    parser.add_argument("--repo", required=True, help="Hub model repo id, e.g. yourname/flickr8k-captioner")
    parser.add_argument("--private", action="store_true",
                        help="create the repo as private (an existing repo keeps its visibility)")
    parser.add_argument("--message", help="commit message")
    args = parser.parse_args(argv)
    try:
        commit = push(args.weights, args.repo, args.private, args.message)
    except PushError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"Pushed {args.weights} to {args.repo}: commit {commit.oid}")
    print(commit.commit_url)
    print("Serve exactly these weights with:")
    print(f"  CAPTIONER_REPO={args.repo} CAPTIONER_REVISION={commit.oid} python app.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
