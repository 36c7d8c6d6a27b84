"""The hooks a diffulex plugin may implement.

A plugin is a module (or object) named by an entry point in the group ``diffulex``;
its functions marked with :data:`diffulex_core.hookimpl` are the implementations.
An implementation may accept any subset of a hook's parameters, so hooks can gain
optional parameters without breaking plugins written against older ones.

Hooks are called through pluggy, so ``tryfirst``/``trylast`` ordering and tracing
(``get_plugin_manager().enable_tracing()``) work as pluggy documents. Hook wrappers
(``@hookimpl(wrapper=True)``, or the old-style ``hookwrapper=True``) are accepted on the hooks
with one answer (``firstresult``: ``diffulex_resolve_weight``, ``diffulex_fix_tokenizer``). The
other hooks keep each plugin's answer apart, attributed to that plugin, or call each plugin alone
(``diffulex_register_families``); a wrapper of one of them fails the plugin at discovery.
"""

import pluggy

__all__ = ["ENTRY_POINT_GROUP", "PROJECT_NAME", "hookimpl", "hookspec"]

PROJECT_NAME = "diffulex"
ENTRY_POINT_GROUP = "diffulex"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def diffulex_register_families(register):
    """Register the model families this plugin provides.

    Called once per plugin, when plugins are first discovered. An exception raised here
    marks the plugin as failed and withdraws every family it registered.

    :param register: call ``register(name, factory, *, override=False)`` once per family.
        ``factory`` builds the model: ``factory(config) -> torch.nn.Module`` where ``config``
        is a mapping shaped like the checkpoint's ``config.json``. It may be a callable or a
        lazy ``"package.module:attr"`` string, imported on first use. A name registered by two
        plugins is an error unless one of them passes ``override=True``.
    :return: ignored.
    """


@hookspec(firstresult=True)
def diffulex_resolve_weight(model, name, ctx):
    """Say where checkpoint tensor ``name`` goes in ``model``.

    Called once per checkpoint tensor while the load is planned, before module resolvers,
    packed-module mappings and exact names are tried.

    :param model: the ``torch.nn.Module`` being loaded (possibly on the meta device).
    :param name: the tensor's full name in the checkpoint.
    :param ctx: a ``LoadContext`` (family, engine config, tensor-parallel rank and size).
    :return: a ``ResolvedWeight``, or ``None`` to let the next resolver try.
        The first non-``None`` result wins; the load report names its plugin (rule
        ``plugin:<entry-point name>``). A hook wrapper may replace the answer (it is then named).
        Diffulex's own ``ResolvedWeight`` class (same fields) is converted, and the report says so.
    """


@hookspec
def diffulex_packed_modules_mapping(model, config):
    """Contribute packed-module mappings (checkpoint name segment -> parameter segment).

    Called once per load, while the load is planned. The results of all plugins are merged
    with the model's own ``packed_modules_mapping``; two plugins mapping the same key
    differently is an error that names both.

    :param model: the ``torch.nn.Module`` being loaded (possibly on the meta device).
    :param config: the engine configuration passed to the loader (may be ``None``).
    :return: a mapping ``{checkpoint_segment: (param_segment, shard_id)}``, or ``None``
        when the plugin has nothing to add for this model.
    """


@hookspec(firstresult=True)
def diffulex_fix_tokenizer(path, tokenizer_config, error):
    """Offer keyword arguments that let a failing tokenizer load succeed.

    Called by ``auto_tokenizer_from_pretrained`` after ``AutoTokenizer.from_pretrained(path, ...)``
    raised and the built-in ``extra_special_tokens`` fix did not apply; called again, with the
    new error, if the retry fails differently. diffulex-core's own fixups are implemented with
    ``trylast=True``, so a plugin's answer comes first.

    :param path: the tokenizer directory.
    :param tokenizer_config: the parsed ``tokenizer_config.json`` (a dict; empty if absent).
    :param error: the exception the last attempt raised, or a ``TokenizerLoadError`` whose
        ``tokenizer`` attribute is a tokenizer that was built but cannot encode text.
    :return: a dict of keyword arguments to retry ``from_pretrained`` with, or ``None``.
        The first non-``None`` result wins. The key ``tokenizer_class`` (a class, or the name of
        one in ``transformers``) makes the retry call that class's ``from_pretrained`` instead of
        ``AutoTokenizer``'s. ``trust_remote_code`` may not be returned: only the caller sets it,
        and keyword arguments the caller passed always win over a fix's.
    """


@hookspec
def diffulex_expected_missing(model):
    """Name the parameters and buffers of ``model`` that checkpoints are expected to lack.

    Called once per load, while the load is planned. Such names are not reported missing
    (rotary caches and other derived buffers, for example). The model may also declare them
    itself in a class attribute ``expected_missing_keys``.

    :param model: the ``torch.nn.Module`` being loaded (possibly on the meta device).
    :return: an iterable of names or ``fnmatch`` patterns (``"*.rotary_emb.*"``), or ``None``.
        The results of all plugins are combined.
    """


@hookspec
def diffulex_ignored_checkpoint_keys(model):
    """Name checkpoint tensors that ``model`` does not take and that may be skipped silently.

    Called once per load, while the load is planned. A checkpoint tensor that no resolver,
    mapping or exact name places, and that matches one of these, is skipped (the report says
    which pattern and source), not reported unexpected: an old ``rotary_emb.inv_freq``, for
    example. The model may also declare them itself in a class attribute ``ignored_checkpoint_keys``.

    :param model: the ``torch.nn.Module`` being loaded (possibly on the meta device).
    :return: an iterable of names or ``fnmatch`` patterns, or ``None``. The results of all
        plugins are combined.
    """


@hookspec
def diffulex_family_examples():
    """Give a small example of each model family this plugin registers, for ``diffulex check``.

    Called by ``diffulex check PLUGIN`` (``diffulex_core.testing.check_plugin``), never
    during a load. For each family the check builds the model on the meta device from the
    example's config, then builds it on the CPU with random weights, writes it as a sharded
    safetensors checkpoint through the family's export, loads that into a meta-built twin and
    requires a clean plan, equal weights and equal outputs. Keep the sizes tiny: the check
    runs them all, on the CPU. The function may import the plugin's model modules inside its
    body, so that importing the plugin stays cheap.

    :return: a mapping ``{family_name: example}``, or ``None``. An example is the family's
        config mapping (shaped like its ``config.json``), or a
        ``diffulex_core.plugin_api.FamilyExample(config, to_checkpoint=None, inputs=None)``:
        ``to_checkpoint(model)`` returns the model's weights under checkpoint names (the
        family's export; ``None``: the model's ``state_dict`` names) and ``inputs(model)`` the
        tuple of positional arguments of one forward call (``None``: token ids
        ``torch.randint(0, vocab, (2, 8))``, with ``vocab`` the first ``nn.Embedding``'s rows).
        The results of all plugins are combined; answering for a family another plugin
        registered is a problem that ``diffulex check`` reports. A family without an example
        here may carry one on its factory (``factory.example_config``, optionally
        ``factory.to_checkpoint``); without either, its build and round trip are not tested.
    """
