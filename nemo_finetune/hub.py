"""The Hugging Face hub, asked once and briefly: a model id that is not in the local cache must answer within
seconds, or the command stops with the fix (the libraries would retry for the better part of a minute and end in a
traceback)."""

from __future__ import annotations

HUB_TIMEOUT_S = 10.0


def hub_problem(flag: str, model_id: str, local_fix: str) -> str | None:
    """Why `model_id` (given as `flag`) cannot be fetched from the hub, naming the fix; None when it can, when it is
    in the local cache, or with HF_HUB_OFFLINE=1 (the cache is then read, and a miss is named by the loader).
    `local_fix` says how to do without the hub."""
    import huggingface_hub
    import requests
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    if constants.HF_HUB_OFFLINE or isinstance(huggingface_hub.try_to_load_from_cache(model_id, "config.json"), str):
        return None
    try:
        huggingface_hub.HfApi().model_info(model_id, timeout=HUB_TIMEOUT_S)
    except (requests.ConnectionError, requests.Timeout) as e:
        return (
            f"{flag} {model_id}: the Hugging Face hub ({constants.ENDPOINT}) could not be reached "
            f"({type(e).__name__}, waited at most {HUB_TIMEOUT_S:.0f} s); without network access, {local_fix} or "
            "set HF_HUB_OFFLINE=1 to use the local cache"
        )
    except GatedRepoError:
        return f"{flag} {model_id} is gated: accept its licence on the hub and log in (HF_TOKEN)"
    except RepositoryNotFoundError:
        return f"{flag} {model_id}: no such model on the hub (or it is private: log in with HF_TOKEN); check the id"
    except HfHubHTTPError as e:
        return f"{flag} {model_id}: the hub answered {str(e).splitlines()[0]}"
    return None
