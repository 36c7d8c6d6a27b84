"""Tokenizer construction across real transformers versions.

Tokenizer files are made here with the ``tokenizers`` library and saved by each transformers
major version (``tests/compat/tokenizer_tool.py``); they are loaded by the project's transformers 5
and, in a second virtual environment created on first use, by transformers 4.57 (which has the
list-``extra_special_tokens`` bug and lacks ``TokenizersBackend``).

That environment is built once (``.venv-transformers4``, kept between sessions), in the background
as soon as a test that needs it is collected (tests/session_builds.py). Loads that share an environment (same
interpreter, PYTHONPATH and variables) run as one subprocess of several jobs (the tool's ``batch``),
each job with its own captured output, so each check still has its own result and message.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from diffulex_core.errors import TokenizerLoadError
from diffulex_core.tokenizer import auto_tokenizer_from_pretrained, coerce_extra_special_tokens
from session_builds import TRANSFORMERS4

TOOL = Path(__file__).parent / "compat" / "tokenizer_tool.py"


@pytest.fixture(scope="session")
def python4() -> str:
    """A Python with transformers 4.57 and diffulex-core (no torch: tokenizers do not need it)."""
    return TRANSFORMERS4.result()


def tool_env(pythonpath: str = "", modules: Path | None = None, env: dict | None = None) -> dict[str, str]:
    """The tool's environment; ``env`` adds variables (a value of None removes one)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("DIFFULEX_", "PYTHONPATH"))}
    base["PYTHONPATH"] = pythonpath
    if modules is not None:  # where transformers would copy remote code it imports
        base["HF_MODULES_CACHE"] = str(modules)
    for key, value in (env or {}).items():
        if value is None:
            base.pop(key, None)
        else:
            base[key] = value
    return base


def tool(python: str, *args: str, pythonpath: str = "", modules: Path | None = None, env: dict | None = None,
         cwd: Path | None = None, timeout: float = 300) -> dict:
    """Run the tool; stdin is closed, so a "run the custom code?" prompt could never wait for input."""
    result = subprocess.run([python, str(TOOL), *args], capture_output=True, text=True, timeout=timeout,
                            env=tool_env(pythonpath, modules, env), stdin=subprocess.DEVNULL, cwd=cwd)
    assert result.returncode == 0, result.stderr
    if not result.stdout:
        return {}
    # anything printed before the JSON (transformers' "run the custom code?" prompt goes to stdout)
    # is reported with stderr
    start = result.stdout.rfind('{"transformers"')
    return {**json.loads(result.stdout[start:]), "stderr": result.stdout[:start] + result.stderr}


def tools(python: str, *jobs: list[str], watch: tuple[Path, ...] = (), pythonpath: str = "",
          modules: Path | None = None, timeout: float = 300) -> list[dict]:
    """``tool`` for several command lines, run in order in one process (stdin closed): one result
    per job, as ``tool`` returns it, its "stderr" that job's own output. ``watch``: paths the tool
    lists after each job (``result["after"][str(path)]``: None if missing, else every path under
    it, relative), for what must hold between two jobs."""
    with tempfile.TemporaryDirectory(prefix="tokenizer-tool-") as out:
        jobs_file = Path(out, "jobs.json")
        jobs_file.write_text(json.dumps({"jobs": [list(job) for job in jobs], "watch": [str(p) for p in watch]}))
        done = subprocess.run([python, str(TOOL), "batch", str(jobs_file), out], capture_output=True, text=True,
                              timeout=timeout, env=tool_env(pythonpath, modules), stdin=subprocess.DEVNULL)
        results_file = Path(out, "results.jsonl")
        lines = [json.loads(line) for line in results_file.read_text().splitlines()] if results_file.exists() else []
    assert done.returncode == 0 and len(lines) == len(jobs), (f"{len(lines)} of {len(jobs)} jobs done", done.stderr)
    results = []
    for line in lines:
        if line["result"] is None:  # save
            results.append({})
        else:
            results.append({**line["result"], "stderr": line["stdout"] + line["stderr"], "after": line["after"]})
    return results


@pytest.fixture(scope="session")
def written(tmp_path_factory, python4) -> dict[str, Path]:
    """Tokenizer directories saved by each version: v5-list, v5-dict, v4-dict, v4-none."""
    dirs = {}
    for python, major in ((sys.executable, "v5"), (python4, "v4")):
        jobs = []
        for extra in ("list", "dict", "none"):
            if major == "v4" and extra == "list":
                continue  # transformers 4.57 cannot even save a list (that is the bug)
            directory = tmp_path_factory.mktemp(f"{major}-{extra}")
            jobs.append(["save", str(directory), "--extra", extra])
            dirs[f"{major}-{extra}"] = directory
        tools(python, *jobs)
    return dirs


WRITTEN = ["v5-list", "v5-dict", "v5-none", "v4-dict", "v4-none"]
CALLER_NAMES = {"my_mask_token": "<|mask|>", "my_start_token": "<|im_start|>", "my_end_token": "<|im_end|>"}


def list_only_dir(written, root: Path) -> Path:
    """transformers 4's files with a list of extra special tokens in their config."""
    directory = root / "list-only"
    directory.mkdir()
    for file in written["v4-dict"].iterdir():
        (directory / file.name).write_bytes(file.read_bytes())
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config["extra_special_tokens"] = ["<|mask|>", "<|im_start|>", "<|im_end|>"]
    for name in ("mask_extra_token", "im_start_token", "im_end_token"):
        config.pop(name, None)
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def no_such_class_dir(written, root: Path) -> Path:
    directory = root / "no-such-class"
    directory.mkdir()
    (directory / "tokenizer.json").write_bytes((written["v5-list"] / "tokenizer.json").read_bytes())
    (directory / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "NoSuchTokenizerFast"}))
    return directory


class Results(dict):
    """Results shared by several tests: each reads its own copy."""

    def __getitem__(self, key):
        return copy.deepcopy(super().__getitem__(key))


@pytest.fixture(scope="module")
def plain_env_loads(written, python4, tmp_path_factory) -> Results:
    """The loads that need no variable, plugin or module cache of their own, one process per
    version (plain AutoTokenizer's, expected to fail, last): ``(major, what)``, ``what`` a name
    of ``written``, ``list-only`` or ``no-such-class``, prefixed ``plain `` for plain AutoTokenizer,
    or ``caller-names v5-list`` (CALLER_NAMES passed)."""
    root = tmp_path_factory.mktemp("plain-env")
    dirs = {**written, "list-only": list_only_dir(written, root), "no-such-class": no_such_class_dir(written, root)}
    ours = [*WRITTEN, "list-only", "no-such-class"]
    jobs = {("v5", name): ["load", str(dirs[name])] for name in ours}
    jobs |= {("v4", name): ["load", str(dirs[name])] for name in ours}
    jobs[("v4", "caller-names v5-list")] = ["load", str(written["v5-list"]), "--extra-json", json.dumps(CALLER_NAMES)]
    jobs[("v5", "plain no-such-class")] = ["load", str(dirs["no-such-class"]), "--plain"]
    jobs |= {("v4", f"plain {name}"): ["load", str(dirs[name]), "--plain"]
             for name in ("v5-list", "list-only", "no-such-class")}
    loads = Results()
    for major, python in (("v5", sys.executable), ("v4", python4)):
        keys = [key for key in jobs if key[0] == major]
        loads |= dict(zip(keys, tools(python, *(jobs[key] for key in keys)), strict=True))
    return loads


def same_keys(*results: dict) -> None:  # drop what differs from run to run
    for result in results:
        result.pop("stderr"), result.pop("seconds")


def comparable(result: dict) -> dict:  # what must agree across versions
    return {k: result[k] for k in ("encodings", "decoded", "decoded_skip_special", "special", "extra_ids",
                                   "extra_are_special")}


def test_transformers5_files_are_written_the_way_that_breaks_transformers4(written):
    config = json.loads((written["v5-list"] / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "TokenizersBackend"
    assert config["extra_special_tokens"] == ["<|mask|>", "<|im_start|>", "<|im_end|>"]


def test_plain_autotokenizer_under_transformers4_fails_on_transformers5_files(plain_env_loads):
    """Why the fallbacks exist: without them, transformers 4.57 cannot load these files."""
    plain = plain_env_loads["v4", "plain v5-list"]
    assert plain["error"] == "ValueError" and "TokenizersBackend does not exist" in plain["message"]


@pytest.mark.parametrize("name", WRITTEN)
def test_files_load_with_identical_encodings_under_both_versions(plain_env_loads, name):
    new, old = plain_env_loads["v5", name], plain_env_loads["v4", name]
    assert new["transformers"].startswith("5.") and old["transformers"].startswith("4.57")
    assert "error" not in new and "error" not in old, (new, old)
    assert comparable(new) == comparable(old)
    # real round trips, not just "no exception"
    assert new["encodings"][1] == [5, 9, 10, 11, 12, 6] and new["extra_ids"] == [4, 5, 6]
    assert new["decoded_skip_special"][:3] == ["hello world", "diffusion is fun !", "hello world"]
    assert new["special"] == {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    assert new["extra_are_special"] == ["<|im_end|>", "<|im_start|>", "<|mask|>"]
    assert new["fixups"] == []  # transformers 5 needs no fix for any of them


def test_transformers5_files_under_transformers4_say_which_fixes_were_applied(plain_env_loads):
    old = plain_env_loads["v4", "v5-list"]
    assert old["class"] == "PreTrainedTokenizerFast"
    assert old["fixups"] == ["plugin:diffulex-core (tokenizer_class)",
                             "builtin:extra_special_tokens list->dict (extra_special_tokens)"]
    named = plain_env_loads["v4", "v5-dict"]
    assert named["fixups"] == ["plugin:diffulex-core (extra_special_tokens, tokenizer_class)"]


def test_list_fallback_alone(plain_env_loads):
    """A list in a config whose class transformers 4 knows: only the list fix is needed, and it is."""
    plain, old = plain_env_loads["v4", "plain list-only"], plain_env_loads["v4", "list-only"]
    assert "error" in plain  # the bug, as an AttributeError or the ImportError transformers raises over it
    assert old["fixups"] == ["builtin:extra_special_tokens list->dict (extra_special_tokens)"]
    assert comparable(old) == comparable(plain_env_loads["v5", "list-only"])
    # Diffulex's names, standard ones included: "<|mask|>" is named (and so becomes) mask_token
    assert old["extra_names"] == {"mask_token": "<|mask|>", "im_start_token": "<|im_start|>",
                                  "im_end_token": "<|im_end|>"}


def test_extra_special_tokens_passed_by_the_caller_are_never_overridden(plain_env_loads):
    old = plain_env_loads["v4", "caller-names v5-list"]
    assert old["fixups"] == ["plugin:diffulex-core (tokenizer_class)"]
    assert old["caller_names"] == CALLER_NAMES


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(TokenizerLoadError, match="tokenizer directory .*nope does not exist"):
        auto_tokenizer_from_pretrained(tmp_path / "nope")


def test_unreadable_tokenizer_config_names_the_file(written, tmp_path):
    directory = tmp_path / "bad-json"
    directory.mkdir()
    (directory / "tokenizer.json").write_bytes((written["v5-list"] / "tokenizer.json").read_bytes())
    (directory / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast",')
    with pytest.raises(TokenizerLoadError, match=r"tokenizer_config.json is not valid JSON"):
        auto_tokenizer_from_pretrained(directory)


@pytest.mark.parametrize("major", ["v5", "v4"])
def test_a_tokenizer_class_that_does_not_exist_surfaces_unchanged(plain_env_loads, major):
    """Whatever plain AutoTokenizer does with an unknown class, we do the same: no fix hides it."""
    plain, ours = plain_env_loads[major, "plain no-such-class"], plain_env_loads[major, "no-such-class"]
    if major == "v4":
        assert plain["error"] == "ValueError" and "NoSuchTokenizerFast does not exist" in plain["message"]
    same_keys(ours, plain)
    assert ours == plain  # same error and message (transformers 4), or the same tokenizer (5 falls back)


# --------------------------------------------------------------------------- plugin fixups


def tokenizer_dir(written, tmp_path, tokenizer_class: str) -> Path:
    directory = tmp_path / tokenizer_class
    directory.mkdir()
    (directory / "tokenizer.json").write_bytes((written["v5-list"] / "tokenizer.json").read_bytes())
    config = {"tokenizer_class": tokenizer_class, "eos_token": "</s>"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


# transformers 5 falls back to its generic class for unknown tokenizer classes, so these run
# under transformers 4, where an unknown class is an error a plugin can fix.


@pytest.fixture(scope="module")
def tokfix_loads(written, python4, plugin_path, tmp_path_factory) -> dict[str, dict]:
    """Under transformers 4 with the tokfix test plugin installed, one process: a load of a
    directory of each tokenizer class, by class."""
    classes = ("FamilyXTokenizer", "NeedsRemoteCode", "BrokenFixup")
    root = tmp_path_factory.mktemp("tokfix")
    jobs = [["load", str(tokenizer_dir(written, root, name))] for name in classes]
    return dict(zip(classes, tools(python4, *jobs, pythonpath=plugin_path("tokfix")), strict=True))


def test_plugin_fixup_is_applied_logged_and_named(tokfix_loads):
    result = tokfix_loads["FamilyXTokenizer"]
    assert result["fixups"] == ["plugin:tokfix (tokenizer_class)"]
    assert result["class"] == "PreTrainedTokenizerFast" and result["encodings"][0] == [7, 8]
    assert result["special"]["eos_token"] == "</s>"
    assert "loaded with fixes: plugin:tokfix (tokenizer_class)" in result["stderr"]


def test_a_fixup_may_not_turn_on_remote_code(tokfix_loads):
    result = tokfix_loads["NeedsRemoteCode"]
    assert result["error"] == "TokenizerLoadError"
    assert "plugin 'tokfix'" in result["message"] and "trust_remote_code" in result["message"]


def test_a_fixup_that_raises_names_its_plugin(tokfix_loads):
    result = tokfix_loads["BrokenFixup"]
    assert result["error"] == "TokenizerLoadError"
    assert "plugin 'tokfix'" in result["message"] and "RuntimeError: fixup exploded" in result["message"]


def test_loads_that_need_no_fix_report_none(written):
    tokenizer = auto_tokenizer_from_pretrained(written["v5-list"])
    assert tokenizer.diffulex_fixups == ()


# --------------------------------------------------------------------------- generated names


def test_coerced_names_are_diffulex_names():
    names = coerce_extra_special_tokens(["<|mask|>", "<mask>", "<|1|>", "<|im-start|>", "<||>"])
    assert names == {"mask_token": "<|mask|>", "mask_token_2": "<mask>", "1_token": "<|1|>",
                     "im_start_token": "<|im-start|>", "extra_special_4_token": "<||>"}
    assert list(names) == ["mask_token", "mask_token_2", "1_token", "im_start_token", "extra_special_4_token"]


def test_coerced_names_more_cases():
    tokens = ["<|im_start|>", "<|im_start|>", "<|im_start|>", "<eos>", "[MASK]", "<pad_token>", "a--b", "class",
              "???", "<|Im-End|>", {"content": "<|x|>"}]
    names = coerce_extra_special_tokens(tokens)
    assert list(names) == ["im_start_token", "im_start_token_2", "im_start_token_3", "eos_token", "mask_token",
                           "pad_token", "a__b_token", "class_token", "extra_special_8_token", "im_end_token",
                           "x_token"]
    assert list(names.values()) == tokens  # values as given (a dict entry stays a dict)
    assert coerce_extra_special_tokens(tokens) == names  # deterministic


def test_a_relative_path_that_is_not_there_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TokenizerLoadError, match="does not exist"):
        auto_tokenizer_from_pretrained("./checkpoints/tokenizer")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(TokenizerLoadError, match="is not a directory"):
        auto_tokenizer_from_pretrained(tmp_path / "file.txt")


# --------------------------------------------------------------------------- Diffulex's signature


def test_tokenizer_path_can_be_passed_by_keyword(written, tmp_path):
    by_keyword = auto_tokenizer_from_pretrained(tokenizer_path=written["v5-list"])
    by_position = auto_tokenizer_from_pretrained(str(written["v5-list"]))
    text = "<|im_start|>diffusion is fun !<|im_end|>"
    assert by_keyword(text)["input_ids"] == by_position(text)["input_ids"] == [5, 9, 10, 11, 12, 6]
    assert by_keyword.diffulex_fixups == ()
    with pytest.raises(TokenizerLoadError, match="does not exist"):
        auto_tokenizer_from_pretrained(tokenizer_path=tmp_path / "nope")


# --------------------------------------------------------------------------- dangling auto_map


def dangling_auto_map_dir(written, tmp_path) -> Path:
    """transformers 5's files, declared PreTrainedTokenizerFast, with an auto_map to a module that is not there."""
    directory = tmp_path / "dangling-auto-map"
    directory.mkdir()
    for file in written["v5-list"].iterdir():
        (directory / file.name).write_bytes(file.read_bytes())
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["auto_map"] = {"AutoTokenizer": ["tokenization_foo.FooTokenizer", None]}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    assert not (directory / "tokenization_foo.py").exists()
    return directory


@pytest.fixture(scope="module")
def dangling_loads(written, python4, tmp_path_factory):
    """``dangling_loads(major)``: one process of that version, in this order, on one directory
    (``dangling_auto_map_dir``) and one module cache: our load without trust_remote_code
    ("ours-untrusted"), plain AutoTokenizer's and ours with it ("plain", "ours"), and a load of
    the files as transformers 5 wrote them ("declared"); and the module cache directory."""
    runs = {}

    def run(major: str) -> tuple[Results, Path]:
        if major not in runs:
            root = tmp_path_factory.mktemp(f"dangling-{major}")
            directory, modules = dangling_auto_map_dir(written, root), root / "hf-modules"
            jobs = {"ours-untrusted": ["load", str(directory)],
                    "plain": ["load", str(directory), "--plain", "--trust-remote-code"],
                    "ours": ["load", str(directory), "--trust-remote-code"],
                    "declared": ["load", str(written["v5-list"])]}
            python = sys.executable if major == "v5" else python4
            runs[major] = Results(zip(jobs, tools(python, *jobs.values(), modules=modules), strict=True)), modules
        return runs[major]

    return run


@pytest.mark.parametrize("major", ["v5", "v4"])
def test_dangling_auto_map_loads_as_the_declared_class(dangling_loads, major):
    loads, modules = dangling_loads(major)
    # what plain AutoTokenizer does: with trust_remote_code=True it imports the module, which is not there
    plain, ours, declared = loads["plain"], loads["ours"], loads["declared"]
    assert plain["error"] == "OSError" and "tokenization_foo.py" in plain["message"]
    assert "error" not in ours, ours
    expected = ["plugin:diffulex-core (tokenizer_class)"]
    if major == "v4":  # then the list those files hold, as for any transformers 5 files
        expected.append("builtin:extra_special_tokens list->dict (extra_special_tokens)")
    assert ours["fixups"] == expected
    assert "loaded with fixes: plugin:diffulex-core (tokenizer_class)" in ours["stderr"]
    assert ours["encodings"][1] == [5, 9, 10, 11, 12, 6] and ours["extra_ids"] == [4, 5, 6]
    assert ours["decoded_skip_special"][:3] == ["hello world", "diffusion is fun !", "hello world"]
    assert comparable(ours) == comparable(declared)
    assert not modules.exists() or not any(modules.rglob("tokenization_foo*"))


@pytest.mark.parametrize("major", ["v5", "v4"])
def test_dangling_auto_map_without_remote_code_needs_no_class_fix_and_never_prompts(dangling_loads, major):
    """Without trust_remote_code transformers uses the declared class itself: no prompt, no fix of ours."""
    ours = dangling_loads(major)[0]["ours-untrusted"]
    assert "error" not in ours, ours
    assert "custom code" not in ours["stderr"]
    list_fix = "builtin:extra_special_tokens list->dict (extra_special_tokens)"
    assert ours["fixups"] == ([] if major == "v5" else [list_fix])
    assert ours["encodings"][1] == [5, 9, 10, 11, 12, 6]


def test_an_auto_map_module_that_is_there_but_fails_surfaces_unchanged(written, tmp_path):
    """Only a missing module is dangling: remote code that exists and fails is the caller's to see."""
    directory = dangling_auto_map_dir(written, tmp_path)
    (directory / "tokenization_foo.py").write_text(
        "import diffulex_no_such_package_xyz\n\n\nclass FooTokenizer:\n    pass\n")
    modules = tmp_path / "hf-modules"
    plain, ours = tools(sys.executable, ["load", str(directory), "--plain", "--trust-remote-code"],
                        ["load", str(directory), "--trust-remote-code"], modules=modules)
    assert plain["error"] == "ImportError" and "diffulex_no_such_package_xyz" in plain["message"]
    same_keys(ours, plain)
    assert ours == plain


# --------------------------------------------------------------------------- remote code: never prompted, never run


def custom_code_dir(written, tmp_path, variant: str) -> tuple[Path, Path]:
    """A tokenizer directory whose config names a custom class in a .py file beside it; importing
    that file writes the returned marker. Plain AutoTokenizer asks "run the custom code? [y/N]":

    - ``fast``: tokenizer_config.json's auto_map names a slow and a fast custom class;
    - ``slow``: only a slow one (``[module.Class, None]``);
    - ``config``: config.json's auto_map names a custom config (and tokenizer) class.
    """
    directory, marker = tmp_path / f"custom-{variant}", tmp_path / f"EXECUTED-{variant}"
    directory.mkdir()
    (directory / "tokenizer.json").write_bytes((written["v5-list"] / "tokenizer.json").read_bytes())
    stamp = f"import pathlib\npathlib.Path({str(marker)!r}).write_text('imported')\n"
    (directory / "tokenization_custom.py").write_text(
        stamp + "from transformers import PreTrainedTokenizerFast\n\n\n"
        "class CustomTokenizerFast(PreTrainedTokenizerFast):\n    pass\n\n\n"
        "class CustomTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    config = {"eos_token": "</s>", "unk_token": "<unk>"}
    tokenizer_map = ["tokenization_custom.CustomTokenizer",
                     None if variant == "slow" else "tokenization_custom.CustomTokenizerFast"]
    if variant == "config":
        (directory / "configuration_custom.py").write_text(
            stamp + "from transformers import PretrainedConfig\n\n\n"
            "class CustomConfig(PretrainedConfig):\n    model_type = 'diffulex-custom'\n")
        (directory / "config.json").write_text(json.dumps({"model_type": "diffulex-custom", "auto_map": {
            "AutoConfig": "configuration_custom.CustomConfig", "AutoTokenizer": tokenizer_map}}))
    else:
        config.update(tokenizer_class="CustomTokenizer", auto_map={"AutoTokenizer": tokenizer_map})
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory, marker


PROMPT = "Do you wish to run the custom code?"


VARIANTS = ("fast", "slow", "config")


@pytest.fixture(scope="module")
def custom_code_loads(written, python4, tmp_path_factory):
    """``custom_code_loads(major)``: one process of that version, one module cache, every variant
    of ``custom_code_dir``: first plain AutoTokenizer's load and ours of each (no variant's code
    trusted yet), then ours with trust_remote_code of each; each job lists every marker and the
    module cache after it (``result["after"]``). Returns ({(variant, "plain"|"ours"|"trusted"):
    result}, {variant: marker}, the module cache)."""
    runs = {}

    def run(major: str):
        if major not in runs:
            root = tmp_path_factory.mktemp(f"custom-code-{major}")
            dirs, markers = {}, {}
            for variant in VARIANTS:
                dirs[variant], markers[variant] = custom_code_dir(written, root, variant)
            modules = root / "hf-modules"
            jobs = {}
            for variant in VARIANTS:
                jobs[variant, "plain"] = ["load", str(dirs[variant]), "--plain"]
                jobs[variant, "ours"] = ["load", str(dirs[variant])]
            for variant in VARIANTS:
                jobs[variant, "trusted"] = ["load", str(dirs[variant]), "--trust-remote-code"]
            python = sys.executable if major == "v5" else python4
            results = tools(python, *jobs.values(), watch=(*markers.values(), modules), modules=modules)
            runs[major] = Results(zip(jobs, results, strict=True)), markers, modules
        return runs[major]

    return run


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("major", ["v5", "v4"])
def test_custom_code_is_never_prompted_for_nor_run_unless_the_caller_trusts_it(custom_code_loads, major, variant):
    loads, markers, modules = custom_code_loads(major)
    plain, ours, trusted = (loads[variant, how] for how in ("plain", "ours", "trusted"))
    marker = str(markers[variant])
    # the real case: plain AutoTokenizer prompts (and, stdin being closed, gives up)
    assert PROMPT in plain["stderr"]
    assert plain["after"][marker] is None

    assert PROMPT not in ours["stderr"] and "[y/N]" not in ours["stderr"]
    assert ours["after"][marker] is None, "the directory's Python code ran without trust_remote_code=True"
    copied = ours["after"][str(modules)]
    assert copied is None or not any("custom" in Path(p).name for p in copied), copied
    assert ours["seconds"] < 10
    if "error" in ours:  # transformers' own refusal, unchanged: it needs the code and may not run it
        assert ours["error"] == "ValueError" and "trust_remote_code=True" in ours["message"], ours
    else:  # transformers 5 ignores config.json's auto_map for tokenizers: a built-in class, no custom one
        assert (major, variant) == ("v5", "config") and not ours["class"].startswith("Custom"), ours

    assert "error" not in trusted, trusted
    assert PROMPT not in trusted["stderr"]
    assert trusted["after"][marker] == "file", "trust_remote_code=True was not honoured"
    if (major, variant) != ("v5", "config"):
        assert trusted["class"] == ("CustomTokenizer" if variant == "slow" else "CustomTokenizerFast")
    assert trusted["encodings"][0] == [7, 8]


def test_every_call_to_transformers_gets_trust_remote_code(written, tmp_path, monkeypatch):
    """Fix retries and the PreTrainedTokenizerFast fallback included: False unless the caller said True."""
    import transformers

    calls: list[tuple[str, object]] = []
    real_auto = transformers.AutoTokenizer.from_pretrained.__func__
    real_fast = transformers.PreTrainedTokenizerFast.from_pretrained.__func__
    failures = {"n": 0}

    inside = []  # calls transformers makes itself, inside AutoTokenizer, are not ours: not recorded

    def auto(cls, path, *args, **kwargs):
        calls.append(("AutoTokenizer", kwargs.get("trust_remote_code", "missing")))
        if failures["n"]:
            failures["n"] -= 1
            raise AttributeError("'list' object has no attribute 'keys'")  # the list bug: the builtin fix applies
        if "dangling" in str(path):
            raise OSError("tokenization_foo.py does not exist")  # as with trust_remote_code=True
        inside.append(1)
        try:
            return real_auto(cls, path, *args, **kwargs)
        finally:
            inside.pop()

    def fast(cls, path, *args, **kwargs):
        if not inside:
            calls.append(("PreTrainedTokenizerFast", kwargs.get("trust_remote_code", "missing")))
        return real_fast(cls, path, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", classmethod(auto))
    monkeypatch.setattr(transformers.PreTrainedTokenizerFast, "from_pretrained", classmethod(fast))
    failures["n"] = 1
    tokenizer = auto_tokenizer_from_pretrained(written["v5-list"])
    assert tokenizer.diffulex_fixups == ("builtin:extra_special_tokens list->dict (extra_special_tokens)",)
    assert calls == [("AutoTokenizer", False), ("AutoTokenizer", False)]
    for passed, expected in ((None, False), (False, False), (True, True)):
        calls.clear()
        (tmp_path / str(passed)).mkdir()
        tokenizer = auto_tokenizer_from_pretrained(dangling_auto_map_dir(written, tmp_path / str(passed)),
                                                   trust_remote_code=passed)
        assert tokenizer.diffulex_fixups == ("plugin:diffulex-core (tokenizer_class)",)
        assert calls == [("AutoTokenizer", expected), ("PreTrainedTokenizerFast", expected)]


# --------------------------------------------------------------------------- hub ids: bounded look-up


@pytest.mark.parametrize("major", ["v5", "v4"])
@pytest.mark.parametrize("network", ["as-is", "refused", "offline"])
def test_a_name_that_is_neither_a_directory_nor_a_hub_repository_fails_in_seconds(python4, tmp_path, major, network):
    """Without this, transformers retries the hub for ~50 s on a machine without network."""
    python = sys.executable if major == "v5" else python4
    env = {"HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_CACHE": None, "HF_HUB_OFFLINE": None,
           "TRANSFORMERS_OFFLINE": None, "HF_ENDPOINT": None}
    if network == "refused":  # a hub nobody listens on, whatever network the machine has
        env["HF_ENDPOINT"] = "http://127.0.0.1:9"
    elif network == "offline":
        env["HF_HUB_OFFLINE"] = "1"
    result = tool(python, "load", "no/such-model", env=env, cwd=tmp_path, timeout=60)
    assert result["error"] == "TokenizerLoadError", result
    message = result["message"]
    assert message.startswith(f"not a local directory: {tmp_path / 'no' / 'such-model'}; as a hub id: "), message
    assert "it is not in the local Hugging Face cache" in message
    if network == "offline":
        assert message.endswith("offline mode is on (HF_HUB_OFFLINE)")
    elif network == "refused":
        assert "http://127.0.0.1:9 could not be reached within 10 s" in message
    else:  # no network here: unreachable; with one, the hub says it has no such repository
        assert "could not be reached" in message or "has no repository 'no/such-model'" in message
    assert result["seconds"] < 10


def test_an_invalid_hub_id_fails_at_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    expected = r"^not a local directory: .*/org/bad--id; as a hub id: 'org/bad--id' is not a valid"
    with pytest.raises(TokenizerLoadError, match=expected):
        auto_tokenizer_from_pretrained("org/bad--id")


def test_a_hub_id_in_the_local_cache_loads_without_the_network(written, tmp_path):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf-home" / "hub" / "models--acme--tiny-tok"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in ("tokenizer.json", "tokenizer_config.json"):
        (snapshot / file).write_bytes((written["v5-list"] / file).read_bytes())
    (repo / ".no_exist" / commit).mkdir(parents=True)  # as the hub client records a file the repo lacks
    (repo / ".no_exist" / commit / "config.json").write_text("")
    env = {"HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_CACHE": None, "HF_HUB_OFFLINE": None,
           "HF_ENDPOINT": "http://127.0.0.1:9"}  # a hub nobody listens on: any request would fail
    result = tool(sys.executable, "load", "acme/tiny-tok", env=env, cwd=tmp_path, timeout=60)
    assert "error" not in result, result
    assert result["encodings"][1] == [5, 9, 10, 11, 12, 6] and result["fixups"] == []
    assert result["seconds"] < 10


# --------------------------------------------------------------------------- tokenizers that cannot encode
# Made here with the project's transformers (5), no second environment needed.

WORDS = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3, "hello": 4, "world": 5, "diffusion": 6}


def word_level_dir(directory: Path, vocab: dict[str, int], unk: str | None = "<unk>", special=(),
                   model_type: str | None = None, bpe: bool = False) -> Path:
    """A WordLevel (or merge-less BPE) tokenizer saved by PreTrainedTokenizerFast.save_pretrained;
    ``model_type`` adds a config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = models.BPE(vocab, [], unk_token=unk) if bpe else models.WordLevel(vocab, unk_token=unk)
    backend = Tokenizer(model)
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    if special:
        backend.add_special_tokens(list(special))
    kwargs = {name: token for name, token in (("unk_token", unk), ("pad_token", "<pad>"), ("eos_token", "</s>"))
              if token in vocab or token in special}
    PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs).save_pretrained(str(directory))
    if model_type is not None:
        (directory / "config.json").write_text(json.dumps({"model_type": model_type}))
    return directory


def test_a_tokenizer_that_encodes_nothing_is_rebuilt_from_tokenizer_json(tmp_path):
    """transformers 5 builds a Qwen2Tokenizer for model_type qwen2 that drops every word of a WordLevel
    tokenizer.json ("hello world" -> []); we load tokenizer.json itself and say so."""
    import transformers

    directory = word_level_dir(tmp_path / "qwen2", WORDS, model_type="qwen2")
    plain = transformers.AutoTokenizer.from_pretrained(str(directory))
    assert plain("hello world", add_special_tokens=False)["input_ids"] == []  # the real breakage, unchanged
    tokenizer = auto_tokenizer_from_pretrained(directory)
    assert tokenizer("hello world diffusion", add_special_tokens=False)["input_ids"] == [4, 5, 6]
    assert tokenizer.decode([4, 5, 6]) == "hello world diffusion"
    assert tokenizer.eos_token == "</s>" and tokenizer.unk_token == "<unk>"
    assert tokenizer.diffulex_fixups == ("plugin:diffulex-core (tokenizer_class)",)


def test_a_tokenizer_no_fix_makes_encode_is_a_typed_error_naming_the_files(tmp_path):
    """An empty vocabulary: neither AutoTokenizer's class nor tokenizer.json's can encode anything."""
    directory = word_level_dir(tmp_path / "empty", {}, unk=None)
    with pytest.raises(TokenizerLoadError) as info:
        auto_tokenizer_from_pretrained(directory)
    message = str(info.value)
    assert str(directory) in message and "tokenizer.json" in message and "tokenizer_config.json" in message
    assert "empty vocabulary" in message


def test_an_unusable_tokenizer_without_tokenizer_json_is_a_typed_error(tmp_path):
    """vocab.json and merges.txt (GPT-2 BPE) whose words no merge reaches: it cannot encode even its
    own tokens, and without tokenizer.json no fix applies."""
    directory = tmp_path / "bpe"
    directory.mkdir()
    (directory / "vocab.json").write_text(json.dumps({"<|endoftext|>": 0, "hello": 1, "world": 2}))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    (directory / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer"}))
    with pytest.raises(TokenizerLoadError) as info:
        auto_tokenizer_from_pretrained(directory)
    message = str(info.value)
    assert str(directory) in message and "vocab.json" in message and "merges.txt" in message
    assert "'hello world'" in message and "no token ids" in message


def test_tokenizers_with_small_or_special_only_vocabularies_are_returned(tmp_path):
    """Not every tokenizer that encodes "hello world" to nothing is broken: a digits-only vocabulary
    without unk (BPE drops other text, WordLevel raises), or one holding only special tokens, is
    returned as built; an unk id is an id."""
    digit_vocab = {str(d): d for d in range(10)}
    digits = auto_tokenizer_from_pretrained(word_level_dir(tmp_path / "bpe-digits", digit_vocab, unk=None, bpe=True))
    assert digits("hello world", add_special_tokens=False)["input_ids"] == []
    assert digits("123", add_special_tokens=False)["input_ids"] == [1, 2, 3] and digits.diffulex_fixups == ()
    strict = auto_tokenizer_from_pretrained(word_level_dir(tmp_path / "digits", digit_vocab, unk=None))
    with pytest.raises(Exception, match="Missing"):
        strict("hello world")
    assert strict("1 2 3", add_special_tokens=False)["input_ids"] == [1, 2, 3] and strict.diffulex_fixups == ()
    special = auto_tokenizer_from_pretrained(word_level_dir(tmp_path / "special", {}, unk=None,
                                                            special=("<pad>", "</s>")))
    assert special("</s><pad>", add_special_tokens=False)["input_ids"] == [1, 0] and special.diffulex_fixups == ()
    unk = auto_tokenizer_from_pretrained(word_level_dir(tmp_path / "unk", {"<unk>": 0, "a": 1}))
    assert unk("hello world", add_special_tokens=False)["input_ids"] == [0, 0] and unk.diffulex_fixups == ()


def test_a_tokenizer_config_nested_too_deep_names_the_file(tmp_path):
    directory = word_level_dir(tmp_path / "deep", WORDS)
    (directory / "tokenizer_config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(TokenizerLoadError, match=r"tokenizer_config.json is not valid JSON .*nest"):
        auto_tokenizer_from_pretrained(directory)


@pytest.mark.parametrize("content", [b"garbage{", b"", b"\xff\xfe\x00{}", b"[" * 100_000 + b"]" * 100_000, b"[]"],
                         ids=["garbage", "empty", "not-utf8", "deep", "array"])
@pytest.mark.parametrize("file", ["tokenizer.json", "special_tokens_map.json"])
def test_an_unreadable_tokenizer_json_names_the_file(tmp_path, content, file):
    directory = word_level_dir(tmp_path / "bad", WORDS)
    (directory / file).write_bytes(content)
    with pytest.raises(TokenizerLoadError) as info:
        auto_tokenizer_from_pretrained(directory)
    assert f"{directory / file} " in str(info.value), str(info.value)
