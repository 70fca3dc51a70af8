"""The Hugging Face Hub, checked in seconds before anything is downloaded: a model, adapter or data set id that is
misspelt, gated, private or unreachable is one line, not 30 s of retries and a traceback from deep inside a library.
"""

import functools
import os
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

from utils.cli import UserError

KINDS = {"model": "model", "dataset": "data set"}


def cached(repo_id: str, repo_type: str) -> bool:
    """True when the Hub cache already holds files of this repository (then the libraries can work offline)."""
    from huggingface_hub import constants

    return (Path(constants.HF_HUB_CACHE) / f"{repo_type}s--{repo_id.replace('/', '--')}").is_dir()


@functools.lru_cache(maxsize=1)
def hub_reachable() -> bool:
    """One quick TCP connection to the Hub's endpoint (HF_ENDPOINT), so that being offline is found once, at once."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    address = (url.hostname, url.port or (443 if url.scheme == "https" else 80))
    answer = []

    def probe():
        try:
            socket.create_connection(address, timeout=5).close()
            answer.append(True)
        except OSError:
            pass

    # In a thread, so that a name lookup that hangs (it has no timeout of its own) is bounded too.
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout=5)
    return bool(answer)


def check_hub_repo(repo_id: str, repo_type: str, what: str) -> None:
    """Raise one line unless `repo_id` is a Hub repository that can be loaded now (cached, or reachable and allowed).

    `what` names it for the user: "base model", "adapter", "data set"."""
    from huggingface_hub import auth_check
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise UserError(f"{what} '{repo_id}' is neither a local path nor a Hugging Face Hub id (like owner/name)") from None
    if cached(repo_id, repo_type):
        return
    page = f"https://huggingface.co/{'datasets/' if repo_type == 'dataset' else ''}{repo_id}"
    if not hub_reachable():
        offline = "HF_HUB_OFFLINE is set" if os.environ.get("HF_HUB_OFFLINE") else "the Hub cannot be reached"
        raise UserError(f"{what} '{repo_id}' is not in the local Hugging Face cache and {offline}: connect to the "
                        f"network, or pass a local path")
    try:
        auth_check(repo_id, repo_type=repo_type)
    except GatedRepoError:
        raise UserError(f"{what} '{repo_id}' is gated: accept its license at {page}, then log in "
                        "(`hf auth login`, or set HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise UserError(f"no {KINDS[repo_type]} '{repo_id}' on the Hugging Face Hub: check the spelling (if it is private, "
                        "log in with `hf auth login` or set HF_TOKEN)") from None
    except OSError as err:  # huggingface_hub's HTTP errors derive from OSError
        raise UserError(f"could not reach {what} '{repo_id}' on the Hub: {str(err).splitlines()[0]}") from None
