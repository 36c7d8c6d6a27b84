"""Tokenizer construction that survives files written by another transformers release.

``auto_tokenizer_from_pretrained`` calls ``AutoTokenizer.from_pretrained`` first. Only when that
fails does it look for a fix: the built-in one for ``extra_special_tokens`` stored as a list
(transformers 5 writes lists; 4.47-4.57 expect a dict), then ``diffulex_fix_tokenizer`` hooks
(the built-in fixups among them: ``TokenizersBackend`` under transformers 4, and a
``PreTrainedTokenizerFast`` config whose ``auto_map`` points to a module file that is not
there). An error no fix addresses propagates unchanged, except that a JSON file the tokenizer
reads which is not a JSON object (garbage, not UTF-8, nested too deep) is a ``TokenizerLoadError``
naming it, where transformers raises a bare ``JSONDecodeError``, ``UnicodeDecodeError`` or
``RecursionError``.

A tokenizer that cannot encode is never returned: transformers 5 can build one from valid files
(for ``model_type: qwen2`` and a WordLevel ``tokenizer.json``, a ``Qwen2Tokenizer`` that encodes
"hello world" as ``[]``). After each construction one short probe encode checks it; a failure
goes through the fixes like an error (the built-in one loads ``tokenizer.json`` as
``PreTrainedTokenizerFast``), else it is a ``TokenizerLoadError`` naming the files.

Remote code: ``trust_remote_code`` is ``False`` unless the caller passed ``True`` (``None`` counts
as not passed), on every call to transformers, fix retries and fallback classes included, so
transformers never asks "run the custom code? [y/N]" and never imports a directory's ``.py``
files on its own; a fix may not turn it on.

A name that is not a local directory is read as a Hugging Face hub id, looked up in bounded time:
first in the local cache only (``local_files_only=True``, no network); if that fails, unless the
caller passed ``local_files_only`` or offline mode is on (``HF_HUB_OFFLINE``), one request of at
most ``HUB_TIMEOUT_S`` seconds asks the hub whether the repository exists; only then does
transformers download it. Otherwise ``TokenizerLoadError`` names both readings ("not a local
directory: ...; as a hub id: ..."), in seconds, where transformers' retries take ~50 s without a
network. A caller who passes ``local_files_only=False`` skips the cache-only step (to pick up a
newer revision). A hub id already in the cache is loaded from it without contacting the hub.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from diffulex_core.environment import env_flag
from diffulex_core.errors import TokenizerLoadError
from diffulex_core.special_tokens import STANDARD_SPECIAL_TOKENS

__all__ = ["auto_tokenizer_from_pretrained", "coerce_extra_special_tokens", "STANDARD_SPECIAL_TOKENS",
           "TOKENIZER_CONFIG"]

log = logging.getLogger("diffulex_core.tokenizer")

TOKENIZER_CONFIG = "tokenizer_config.json"
# the JSON files transformers may read to build a tokenizer (each holds a JSON object), and the others
JSON_FILES = (TOKENIZER_CONFIG, "tokenizer.json", "special_tokens_map.json", "added_tokens.json", "config.json",
              "vocab.json", "chat_template.json")
TOKENIZER_FILES = JSON_FILES + ("merges.txt", "vocab.txt", "tokenizer.model", "spiece.model")
PROBE_TEXT = "hello world"
MAX_ATTEMPTS = 4  # the first try plus up to three fixes, each for a different error
HUB_TIMEOUT_S = 10.0  # the one request asking the hub whether a repository exists
# huggingface_hub's rule for repository ids: "name" or "namespace/name", word characters, "-", "."
_HUB_ID = re.compile(r"(?:[\w\-.]+/)?[\w\-.]+")
_LIST_KEYS_ERROR = "'list' object has no attribute 'keys'"


def _token_text(token: Any) -> str:
    return str(token.get("content", "")) if isinstance(token, dict) else str(getattr(token, "content", token))


def coerce_extra_special_tokens(tokens: list[Any]) -> dict[str, Any]:
    """A list of extra special tokens as the dict transformers 4.47-4.57 expect.

    The names are Diffulex's: the token text without surrounding ``<``, ``>`` and ``|``, ``-`` as
    ``_``, other runs of non-word characters as one ``_``, lower-cased, ending in ``_token``
    (``"<|im-start|>"`` -> ``im_start_token``, ``"<|1|>"`` -> ``1_token``, an empty name ->
    ``extra_special_{index}_token``); a repeated name gets ``_2``, ``_3``, ... after it
    (``mask_token``, ``mask_token_2``). Standard names are not avoided: under transformers 4 a
    token named ``mask_token`` this way also becomes the tokenizer's ``mask_token``, as in Diffulex.
    Unlike Diffulex, an entry given as a dict (``{"content": ...}``) is named by its content and
    kept as it is, not turned into a string.
    """
    names: dict[str, Any] = {}
    for index, token in enumerate(tokens):
        names[_special_token_name(_token_text(token), index, names)] = token
    return names


def _special_token_name(text: str, index: int, used: Any) -> str:
    name = re.sub(r"\W+", "_", text.strip("<>|").replace("-", "_")).strip("_").lower()
    if not name:
        name = f"extra_special_{index}"
    if not name.endswith("_token"):
        name = f"{name}_token"
    unique, suffix = name, 1
    while unique in used:
        suffix += 1
        unique = f"{name}_{suffix}"
    return unique


def _read_config(path: Path) -> dict[str, Any]:
    file = path / TOKENIZER_CONFIG
    return _read_json_object(file) if file.is_file() else {}


def _read_json_object(file: Path) -> dict[str, Any]:
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except RecursionError:
        raise TokenizerLoadError(f"{file} is not valid JSON (arrays and objects nested too deep to read); "
                                 f"fix or regenerate it") from None
    except ValueError as exc:  # UnicodeDecodeError included
        raise TokenizerLoadError(f"{file} is not valid JSON ({exc}); fix or regenerate it") from None
    if not isinstance(value, dict):
        raise TokenizerLoadError(f"{file} holds a JSON {type(value).__name__}, not an object")
    return value


def _invalid_json(path: Path) -> TokenizerLoadError | None:
    """The error naming the first of ``JSON_FILES`` in ``path`` that is not a JSON object, if any.
    Only read after a load failed: transformers' own error for such a file does not name it."""
    for name in JSON_FILES:
        if (path / name).is_file():
            try:
                _read_json_object(path / name)
            except TokenizerLoadError as error:
                return error
    return None


def _encoding_problem(tokenizer: Any) -> str | None:
    """Why ``tokenizer`` cannot encode text, or ``None``. One probe encode when it works. A small
    vocabulary may legitimately drop ``PROBE_TEXT`` (or raise: WordLevel without unk), so then a few of
    the tokenizer's own ordinary tokens, decoded, must encode; special tokens only leave none to try."""
    try:
        if len(tokenizer) == 0:
            return "has an empty vocabulary"
        if tokenizer.encode(PROBE_TEXT, add_special_tokens=False):
            return None  # an unk id is an id
    except Exception:
        pass
    try:
        added = set(tokenizer.added_tokens_decoder)
        ids = [i for i in range(min(len(tokenizer), len(added) + 3)) if i not in added][:3]
        text = tokenizer.decode(ids) if ids else ""
    except Exception:
        return None  # nothing we can tell from
    if not text.strip():
        return None
    try:
        if tokenizer.encode(text, add_special_tokens=False):
            return None
    except Exception as error:
        return f"cannot encode {PROBE_TEXT!r} nor its own tokens {text!r} ({_summary(error)})"
    return f"encodes {PROBE_TEXT!r} and its own tokens {text!r} to no token ids"


def _check_encodes(path: Path, tokenizer: Any) -> None:
    """Raise a ``TokenizerLoadError`` whose ``tokenizer`` is ``tokenizer`` when it cannot encode text,
    so the fixes see it as they see any failed load."""
    problem = _encoding_problem(tokenizer)
    if problem is None:
        return
    files = [name for name in TOKENIZER_FILES if (path / name).is_file()]
    error = TokenizerLoadError(f"{path}: the {type(tokenizer).__name__} built from "
                               f"{', '.join(files) or 'no tokenizer file there'} {problem}")
    error.tokenizer = tokenizer
    raise error


def _caused_by_list_keys(error: BaseException) -> bool:
    """True when ``error`` or an exception it was raised from is the list-``extra_special_tokens`` bug.

    transformers 4.5x may re-raise it as an unrelated ImportError (protobuf) while handling it.
    """
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, AttributeError) and _LIST_KEYS_ERROR in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def _builtin_fix(config: dict[str, Any], kwargs: dict[str, Any], error: BaseException) -> dict[str, Any] | None:
    extra = config.get("extra_special_tokens")
    if isinstance(extra, list) and "extra_special_tokens" not in kwargs and _caused_by_list_keys(error):
        return {"extra_special_tokens": coerce_extra_special_tokens(extra)}
    return None


def _plugin_fix(path: Path, config: dict[str, Any], error: BaseException) -> tuple[str, dict[str, Any]] | None:
    from diffulex_core.plugins import get_plugin_manager
    from diffulex_core.plugins.hook_calls import first_result

    name, fix = first_result(get_plugin_manager().hook.diffulex_fix_tokenizer,
                             {"path": str(path), "tokenizer_config": dict(config), "error": error},
                             error=TokenizerLoadError)
    if fix is None:
        return None
    if not isinstance(fix, dict) or not all(isinstance(k, str) for k in fix):
        raise TokenizerLoadError(f"plugin {name!r}: diffulex_fix_tokenizer returned {fix!r}; "
                                 f"expected a dict of keyword arguments or None")
    if "trust_remote_code" in fix:
        raise TokenizerLoadError(f"plugin {name!r}: diffulex_fix_tokenizer asked for trust_remote_code; "
                                 f"only the caller decides that")
    return name, fix


def _construct(path: Path | str, kwargs: dict[str, Any]) -> Any:
    """``AutoTokenizer.from_pretrained``, or the class a fix named in ``tokenizer_class``."""
    import transformers

    kwargs = dict(kwargs)
    cls = kwargs.pop("tokenizer_class", None)
    if cls is None:
        return transformers.AutoTokenizer.from_pretrained(str(path), **kwargs)
    if isinstance(cls, str):
        name = cls
        cls = getattr(transformers, name, None)
        if cls is None:
            raise TokenizerLoadError(f"a tokenizer fix asked for class {name!r}, which transformers "
                                     f"{transformers.__version__} does not have")
    return cls.from_pretrained(str(path), **kwargs)


def auto_tokenizer_from_pretrained(tokenizer_path: str | Path, **kwargs: Any) -> Any:
    """Load a tokenizer like ``AutoTokenizer.from_pretrained(tokenizer_path, **kwargs)``, fixing
    known cross-version breakage. The result's ``diffulex_fixups`` lists the fixes applied (empty
    when none was needed). ``kwargs`` the caller passed always win over a fix's.

    ``trust_remote_code`` is ``False`` unless passed as ``True``: code in the directory runs only
    when the caller asks for it, and transformers never prompts. A name that is not a local
    directory is looked up as a hub id in bounded time (see the module docstring).

    ``tokenizer_path`` may be passed by position or by keyword, as in Diffulex's
    ``diffulex.utils.auto_tokenizer_from_pretrained``.
    """
    kwargs = dict(kwargs)
    if kwargs.get("trust_remote_code") is None:
        kwargs["trust_remote_code"] = False  # never None: None makes transformers prompt
    name = str(tokenizer_path)
    path = Path(tokenizer_path)
    if path.exists() and not path.is_dir():
        raise TokenizerLoadError(f"{path} is not a directory; pass the directory holding the tokenizer files")
    if not path.exists() and (path.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1):
        raise TokenizerLoadError(f"tokenizer directory {path} does not exist")
    if not path.exists():
        return _from_hub(name, path, kwargs)
    return _load(path, _read_config(path), kwargs)


def _from_hub(name: str, path: Path, kwargs: dict[str, Any]) -> Any:
    """``name`` is not a local directory: load it as a hub id, failing in seconds when that cannot work."""
    def fail(reading: str, cause: BaseException | None = None) -> TokenizerLoadError:
        error = TokenizerLoadError(f"not a local directory: {path.absolute()}; as a hub id: {reading}")
        error.__cause__ = cause
        return error

    if not _HUB_ID.fullmatch(name) or "--" in name or ".." in name or len(name) > 96:
        raise fail(f"{name!r} is not a valid repository id")
    cache_error: BaseException | None = None
    cached = ""  # what the cache-only try found, when it ran
    if kwargs.get("local_files_only") is not False:
        try:
            return _load(path, {}, {**kwargs, "local_files_only": True})
        except Exception as error:  # not cached (or cached and broken): said below if the hub cannot help
            cache_error = error
        cached = (f"loading it from the local Hugging Face cache failed ({_summary(cache_error)})"
                  if _in_hub_cache(name, kwargs) else "it is not in the local Hugging Face cache")
        if kwargs.get("local_files_only"):
            raise fail(f"{cached}, and local_files_only=True forbids the network", cache_error)
        if _hub_offline():
            raise fail(f"{cached}, and offline mode is on (HF_HUB_OFFLINE)", cache_error)
    problem = _hub_problem(name, kwargs)
    if problem is not None:
        raise fail(f"{cached}, and {problem}" if cached else problem, cache_error)
    return _load(path, {}, kwargs)


def _in_hub_cache(repo_id: str, kwargs: dict[str, Any]) -> bool:
    """Whether the local cache holds any of the files a tokenizer is read from."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return any(isinstance(try_to_load_from_cache(repo_id, file, cache_dir=kwargs.get("cache_dir"),
                                                     revision=kwargs.get("revision")), str)
                   for file in (TOKENIZER_CONFIG, "tokenizer.json", "config.json"))
    except Exception:  # an id or cache layout it rejects: nothing usable there
        return False


def _summary(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def _hub_offline() -> bool:
    import huggingface_hub

    check = getattr(huggingface_hub, "is_offline_mode", None)  # huggingface_hub 1.x
    if check is not None and check():
        return True
    from huggingface_hub import constants

    return bool(getattr(constants, "HF_HUB_OFFLINE", False)) or \
        env_flag("TRANSFORMERS_OFFLINE", False)


def _hub_problem(repo_id: str, kwargs: dict[str, Any]) -> str | None:
    """Why the hub cannot provide ``repo_id``, from one request of at most ``HUB_TIMEOUT_S`` seconds;
    ``None`` when it has the repository (transformers then downloads it)."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    endpoint = getattr(constants, "ENDPOINT", "the hub")
    revision = kwargs.get("revision")
    try:
        HfApi().model_info(repo_id, revision=revision, token=kwargs.get("token"), timeout=HUB_TIMEOUT_S)
    except GatedRepoError:
        return None  # it exists; transformers reports what access it needs
    except RepositoryNotFoundError:
        return f"{endpoint} has no repository {repo_id!r} (or it is private or gated: pass token=...)"
    except RevisionNotFoundError:
        return f"{endpoint} has no revision {revision!r} of {repo_id!r}"
    except Exception as error:  # connection refused, name resolution, timeout, proxy, 5xx
        return f"{endpoint} could not be reached within {HUB_TIMEOUT_S:g} s ({_summary(error)})"
    return None


def _load(path: Path, config: dict[str, Any], kwargs: dict[str, Any]) -> Any:
    """The first try and the fix retries; every try passes ``kwargs`` (``trust_remote_code`` included)."""
    fix_kwargs: dict[str, Any] = {}
    applied: list[str] = []
    first_error: BaseException | None = None
    for _ in range(MAX_ATTEMPTS):
        try:
            tokenizer = _construct(path, {**fix_kwargs, **kwargs})
            _check_encodes(path, tokenizer)
        except Exception as error:
            first_error = first_error or error
            fix = _builtin_fix(config, {**fix_kwargs, **kwargs}, error)
            source = "builtin:extra_special_tokens list->dict"
            if fix is None:
                found = _plugin_fix(path, config, error)
                if found is not None:
                    source = f"plugin:{found[0]}"
                    fix = found[1]
            if fix is None or all(fix_kwargs.get(k, object()) == v for k, v in fix.items()):
                invalid = None if isinstance(error, TokenizerLoadError) else _invalid_json(path)
                if applied:
                    (invalid or error).add_note(f"diffulex: tokenizer fixes tried for {path}: {', '.join(applied)}")
                if invalid is not None:
                    raise invalid from error
                raise  # nothing we know applies: the original error, unchanged
            fix_kwargs.update(fix)
            applied.append(f"{source} ({', '.join(sorted(fix))})")
            continue
        try:
            tokenizer.diffulex_fixups = tuple(applied)
        except AttributeError:  # a tokenizer class with __slots__: the log line still says it
            pass
        if applied:
            log.warning("tokenizer %s loaded with fixes: %s", path, "; ".join(applied))
        return tokenizer
    raise TokenizerLoadError(f"tokenizer {path} still fails after {MAX_ATTEMPTS} attempts with fixes "
                             f"{', '.join(applied)}") from first_error
