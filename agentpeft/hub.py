"""``push``: upload a registered version to the Hugging Face Hub."""

from __future__ import annotations

import tempfile
from pathlib import Path

from .errors import AgentpeftError
from .registry import export, resolve


def push(ref: str, repo_id: str, private: bool = False) -> str:
    """Upload registered version ``ref`` (``NAME`` or ``NAME@VERSION``), exported in hf format, to the
    model repository ``repo_id`` (created if missing); returns the commit's URL.

    Needs a token: ``HF_TOKEN`` or the one ``hf auth login`` saved. The export is written to a temporary
    folder, uploaded with ``HfApi.upload_folder`` in one commit, then removed.
    """
    import httpx
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HFValidationError, HfHubHTTPError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise AgentpeftError(f"invalid repository id {repo_id!r}; use OWNER/NAME, e.g. my-org/support-bot") from None
    if "/" not in repo_id:
        raise AgentpeftError(f"invalid repository id {repo_id!r}; use OWNER/NAME, e.g. my-org/{repo_id}")
    source = resolve(ref)  # a bad reference fails before the token is asked for
    token = get_token()
    if not token:
        raise AgentpeftError("no Hugging Face token: set HF_TOKEN or run `hf auth login`, then push again")
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="agentpeft-push-") as scratch:
        folder = export(ref, Path(scratch) / source.parent.name)
        try:
            api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
            commit = api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model",
                                       commit_message=f"agentpeft: {source.parent.name}@{source.name}")
        except (HfHubHTTPError, httpx.HTTPError, OSError) as exc:  # refused, unreachable, or cut off
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise AgentpeftError(f"pushing to {repo_id} failed: {first}") from None
    return str(getattr(commit, "commit_url", commit))
