"""What a model card says about its source on the Hugging Face Hub: the repo id (``base_model``),
the licence of the source's own card, and names that publish no path of the machine that made
the checkpoint."""

from __future__ import annotations

import json
import re

from core.errors import CardError
from core.storage import Storage
from planners.plan import Plan

#: A source folder in a Hugging Face cache: ``.../models--OWNER--NAME/snapshots/REVISION``.
_HF_CACHE_SNAPSHOT = re.compile(r"(?:^|/|^local:)models--([^/]+?)--([^/]+)/snapshots/[^/]+/?$")
#: YAML front matter, as huggingface_hub's ``REGEX_YAML_BLOCK`` finds it.
_YAML_BLOCK = re.compile(r"^(\s*---[\r\n]+)([\S\s]*?)([\r\n]+---(\r\n|\n|$))")
#: The source card's front-matter fields the new card carries: the weights keep their licence.
LICENSE_FIELDS = ("license", "license_name", "license_link")
#: Only the top of a source card is read for its front matter.
_FRONT_MATTER_BYTES = 1 << 20


def is_hub_id(value: object) -> bool:
    """Whether ``value`` is a Hub model repo id ``OWNER/NAME`` by the Hub's own rules."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not isinstance(value, str) or value.count("/") != 1:
        return False
    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


def check_base_model(value: str) -> str:
    """``--base-model``: a Hub repo id, or a clear error (the Hub reads it as a link to that repo)."""
    if not is_hub_id(value):
        raise CardError(f"--base-model {json.dumps(value)} is not a Hub repo id: expected OWNER/NAME of letters, "
                        f"digits, '-', '_' and '.' (no '--' or '..', at most 96 characters), like "
                        f"openai/gpt-oss-20b; leave it out when the source is not on the Hub")
    return value


def hub_id(plan: Plan) -> str | None:
    """The source's Hub repo id: from an ``hf://`` source URL or a Hugging Face cache folder,
    else a config ``_name_or_path`` that is one."""
    m = re.match(r"^hf://(?:models/)?([^/@]+/[^/@]+)", plan.source_url)
    cache = _HF_CACHE_SNAPSHOT.search(plan.source_url)
    for name in (m and m.group(1), cache and f"{cache.group(1)}/{cache.group(2)}", plan.config.get("_name_or_path")):
        if is_hub_id(name):
            return str(name)
    return None


def file_name(path: object) -> str:
    """The last component of a path or URL: a card is published, the paths of this machine are not."""
    return str(path).rstrip("/").rsplit("/", 1)[-1] if path else ""


def source_name(plan: Plan, base_model: str | None, url: object = None) -> str:
    """How the card names a source: the one the output was made from by Hub id when known; one
    that was read (``url``, what verify checked against) by Hub id only when it is that Hub repo
    (a local folder is named by its folder name, never as the Hub model)."""
    if base_model and url is None:
        return base_model
    m = re.match(r"^hf://(?:models/)?([^/@]+/[^/@]+)", str(url or ""))
    if base_model and m and m.group(1) == base_model:
        return base_model
    where = str(url or plan.source_url)
    cache = _HF_CACHE_SNAPSHOT.search(where)
    if cache:  # a Hub repo's local copy: named by its cache folder, which says which repo and revision
        return where[cache.start():].strip("/").removeprefix("local:")
    return file_name(where).removeprefix("local:")


def source_license(card_text: str | None) -> dict[str, str]:
    """The licence fields of a source card's YAML front matter (none when absent or unreadable)."""
    import yaml

    m = _YAML_BLOCK.search(card_text or "")
    try:
        meta = yaml.safe_load(m.group(2)) if m else None
    except yaml.YAMLError:
        return {}
    if not isinstance(meta, dict):
        return {}
    return {k: meta[k] for k in LICENSE_FIELDS if isinstance(meta.get(k), str) and meta[k].strip()}


def read_head(storage: Storage, name: str) -> str:
    return storage.read_range(name, 0, min(storage.size(name), _FRONT_MATTER_BYTES)).decode("utf-8", "replace")
