"""The functional inner loop: adapt a dict of delta tensors without copying the frozen model.

This is the small API for researchers who write their own meta-learning loop (in the spirit of
learn2learn's ``clone()``/``adapt()``, but functional). The frozen base weights stay inside the
module; only the delta tensors travel, as a ``name -> tensor`` dict fed to
:func:`torch.func.functional_call`::

    from deltameta.meta import functional as F

    model = F.inject(model, delta_config)            # add deltas to the frozen base
    deltas = F.get_deltas(model)                     # {name: Parameter}
    loss_fn = F.lm_loss_fn(model)                    # (params, batch) -> scalar
    fast = F.adapt(deltas, support, loss_fn, steps=2, lr=0.1, first_order=True)
    query_loss = loss_fn(fast, query)
    query_loss.backward()                            # meta-gradient lands in deltas' .grad

``adapt`` returns new tensors that are functions of the input dict, so the query loss
differentiates back to the meta-parameters: through the full second-order graph when
``first_order=False``, or with the identity Jacobian (first-order MAML) when ``first_order=True``.
The inner optimizer is SGD (default) or Adam (``optimizer="adam"``), whose moment estimates are
ordinary tensors of the graph, so second-order meta-gradients flow through them as well.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import Tensor, nn

from deltameta.base import forward_accepts
from deltameta.errors import ConfigError
from deltameta.tasks.scoring import grouped_cross_entropy, grouped_lm_loss, lm_loss

Params = dict[str, Tensor]
Batch = Mapping[str, Tensor]
LossFn = Callable[[Mapping[str, Tensor], Batch], Tensor]

#: Keys of an encoded batch that are model inputs (``labels`` is kept for the loss).
MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "position_ids")

#: Inner-loop optimizers of :func:`adapt`.
INNER_OPTIMIZERS = ("sgd", "adam")


def inject(model: nn.Module, config: Any) -> nn.Module:
    """Add delta modules to the frozen linears of ``model`` (in place).

    Args:
        model: A frozen base model (see :func:`deltameta.base.load_base`).
        config: A :class:`deltameta.deltas.DeltaConfig`.

    Returns:
        ``model`` itself, with deltas injected.
    """
    from deltameta.meta._compat import deltas_api

    result = deltas_api().inject_deltas(model, config)
    return result if isinstance(result, nn.Module) else model


def get_deltas(model: nn.Module) -> dict[str, nn.Parameter]:
    """Return the meta-learned delta tensors of ``model`` as ``{name: Parameter}``.

    Names are those of ``model.named_parameters()``, so the dict (or any dict of tensors with
    the same keys and shapes) can be passed to :func:`forward_with`. When deltameta's delta
    modules are not injected, every trainable parameter of ``model`` is returned, which keeps
    this API usable on any ``nn.Module``.

    Args:
        model: Model with injected deltas.

    Returns:
        Ordered mapping of names to the live parameters.
    """
    from deltameta.meta._compat import deltas_api

    api = deltas_api(required=False)
    if api is not None:
        found = dict(api.delta_parameters(model))
        if found:
            return found
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def detached(params: Mapping[str, Tensor], requires_grad: bool = True) -> Params:
    """Return leaf copies of ``params`` (no history), optionally requiring gradients."""
    return {k: v.detach().clone().requires_grad_(requires_grad) for k, v in params.items()}


def forward_with(model: nn.Module, params: Mapping[str, Tensor], batch: Batch, **kwargs: Any) -> Any:
    """Run ``model`` with ``params`` in place of its own tensors of the same names.

    Args:
        model: The module (its other weights are used as they are; nothing is copied).
        params: ``name -> tensor`` overrides (e.g. adapted deltas, possibly task-batched with a
            leading task dimension, when the delta layers support it).
        batch: Model inputs; keys outside :data:`MODEL_INPUT_KEYS` (such as ``labels``) are not
            passed to the model.
        **kwargs: Extra keyword arguments for the model's forward.

    Returns:
        The model's output.
    """
    inputs = {k: v for k, v in batch.items() if k in MODEL_INPUT_KEYS}
    inputs.update(kwargs)
    return torch.func.functional_call(model, dict(params), args=(), kwargs=inputs, strict=False)


def _logits(output: Any) -> Tensor:
    return output.logits if hasattr(output, "logits") else output


#: Mean next-token cross-entropy over target positions (``labels != -100``): the one
#: implementation, :func:`deltameta.tasks.scoring.lm_loss` (float64 logits stay float64).
target_loss = lm_loss
#: Per-task ``target_loss`` of a task-batched batch: :func:`deltameta.tasks.scoring.grouped_lm_loss`.
grouped_target_loss = grouped_lm_loss


def target_positions(labels: Tensor) -> Tensor:
    """Positions ``t`` whose logits predict an answer token (``labels[:, t + 1] != -100`` in any row).

    :func:`lm_loss_fn` projects only these positions onto the vocabulary (``logits_to_keep``):
    the same loss for a fraction of the LM head's time and memory, since answers are a few
    tokens of a longer prompt.
    """
    return (labels[:, 1:] != -100).any(0).nonzero().flatten()


def lm_loss_fn(model: nn.Module, groups: int | None = None, **forward_kwargs: Any) -> LossFn:
    """Build the usual loss closure: target-only causal-LM loss with the given deltas.

    Args:
        model: Model with injected deltas.
        groups: ``None`` for an ordinary batch (mean loss); ``T`` for a task-batched batch of ``T``
            equal groups, where the closure returns the **sum** of the per-task mean losses so
            that the gradient of each task's slice of task-batched params is that task's gradient.
        **forward_kwargs: Extra arguments for the model's forward.

    Returns:
        ``loss_fn(params, batch) -> scalar``.
    """

    sparse_head = forward_accepts(model, "logits_to_keep") and "logits_to_keep" not in forward_kwargs

    def loss_fn(params: Mapping[str, Tensor], batch: Batch) -> Tensor:
        labels = batch["labels"]
        keep = target_positions(labels) if sparse_head else None
        if keep is not None and 0 < keep.numel() < labels.shape[1] - 1:
            logits = _logits(forward_with(model, params, batch, logits_to_keep=keep, **forward_kwargs))
            losses = grouped_cross_entropy(logits, labels[:, keep + 1], groups or 1)
        else:
            logits = _logits(forward_with(model, params, batch, **forward_kwargs))
            losses = grouped_target_loss(logits, labels, groups or 1)
        return losses[0] if groups is None else losses.sum()

    return loss_fn


def clip_grads(grads: list[Tensor | None], max_norm: float | None, task_dim: bool = False) -> list[Tensor | None]:
    """Scale gradients so that their global L2 norm is at most ``max_norm`` (differentiably).

    Args:
        grads: Gradients (``None`` entries are ignored).
        max_norm: Threshold; ``None`` or ``<= 0`` disables clipping.
        task_dim: Gradients carry a leading task dimension; clip each task's slice separately.

    Returns:
        The clipped gradients.
    """
    if not max_norm or max_norm <= 0:
        return grads
    present = [g for g in grads if g is not None]
    if not present:
        return grads
    if task_dim:
        sq = sum(g.pow(2).reshape(g.shape[0], -1).sum(1) for g in present)
        scale = (max_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
        return [None if g is None else g * scale.view(-1, *([1] * (g.dim() - 1))).to(g.dtype) for g in grads]
    norm = torch.sqrt(sum(g.pow(2).sum() for g in present))
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    return [None if g is None else g * scale.to(g.dtype) for g in grads]


def inner_gradients(
    params: Mapping[str, Tensor],
    loss: Tensor,
    first_order: bool = True,
    clip: float | None = None,
    task_dim: bool = False,
    on_gradients: Callable[[list[Tensor | None]], None] | None = None,
) -> list[Tensor | None]:
    """Gradients of ``loss`` with respect to ``params`` (in order), clipped, for one inner step.

    Args:
        params: Current tensors.
        loss: Scalar loss computed from ``params`` (it must require grad).
        first_order: Detach the gradients; otherwise keep their graph (``create_graph=True``).
        clip: Global-norm threshold (per task when ``task_dim``).
        task_dim: Params carry a leading task dimension.
        on_gradients: Called with the gradients before clipping, detached (for example to reuse
            the first inner step's gradient in the outer objective without another pass).

    Returns:
        One gradient per tensor of ``params`` (``None`` where ``loss`` does not depend on it).
    """
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=not first_order, allow_unused=True)
    if first_order:
        grads = tuple(None if g is None else g.detach() for g in grads)
    if on_gradients is not None:
        on_gradients([None if g is None else g.detach() for g in grads])
    return clip_grads(list(grads), clip, task_dim=task_dim)


def _lr_of(lr: float | Mapping[str, Tensor], name: str) -> float | Tensor:
    return lr[name] if isinstance(lr, Mapping) else lr


def sgd_step(
    params: Mapping[str, Tensor],
    loss: Tensor,
    lr: float | Mapping[str, Tensor],
    first_order: bool = True,
    clip: float | None = None,
    task_dim: bool = False,
    on_gradients: Callable[[list[Tensor | None]], None] | None = None,
) -> Params:
    """One differentiable SGD step on ``params``.

    Args:
        params: Current tensors (must require grad or be functions of tensors that do).
        loss: Scalar loss computed from ``params``.
        lr: One learning rate, or a per-tensor mapping (Meta-SGD: tensors broadcastable to each
            parameter, learnable).
        first_order: Detach the gradient (first-order MAML); otherwise keep its graph
            (``create_graph=True``) for second-order meta-gradients.
        clip: Global-norm threshold for the inner gradient.
        task_dim: Params carry a leading task dimension (clip per task).
        on_gradients: See :func:`inner_gradients`.

    Returns:
        The updated tensors ``p - lr * g``.
    """
    if not loss.requires_grad:  # e.g. the controller switched every delta off: nothing to adapt
        return dict(params)
    grads = inner_gradients(params, loss, first_order=first_order, clip=clip, task_dim=task_dim,
                            on_gradients=on_gradients)
    new: Params = {}
    for (name, p), g in zip(params.items(), grads):
        new[name] = p if g is None else p - _lr_of(lr, name) * g
    return new


def _sqrt(v: Tensor) -> Tensor:
    """``sqrt(v)`` whose derivative at ``v == 0`` is 0 instead of ``inf`` (which would give NaN)."""
    if not v.requires_grad:
        return v.sqrt()
    positive = v > 0
    return torch.where(positive, torch.where(positive, v, torch.ones_like(v)).sqrt(), torch.zeros_like(v))


def adam_direction(
    grad: Tensor,
    m: Tensor | None,
    v: Tensor | None,
    step: int,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> tuple[Tensor, Tensor, Tensor]:
    """One Adam update of a single tensor, written out of differentiable tensor operations.

    Args:
        grad: The gradient (with its graph for second-order meta-gradients).
        m: First-moment estimate before this step (``None`` at the first step: zeros).
        v: Second-moment estimate before this step (``None``: zeros).
        step: 1-based step number (for the bias corrections).
        betas: Adam's ``(beta1, beta2)``.
        eps: Adam's epsilon (added to ``sqrt(v_hat)``).

    Returns:
        ``(direction, m, v)``: the parameter moves by ``-lr * direction``; ``m`` and ``v`` are
        the new moment estimates (new tensors, never updated in place).
    """
    beta1, beta2 = betas
    m = (1 - beta1) * grad if m is None else beta1 * m + (1 - beta1) * grad
    v = (1 - beta2) * grad * grad if v is None else beta2 * v + (1 - beta2) * grad * grad
    m_hat = m / (1 - beta1**step)
    v_hat = v / (1 - beta2**step)
    return m_hat / (_sqrt(v_hat) + eps), m, v


def adam_step(
    params: Mapping[str, Tensor],
    loss: Tensor,
    lr: float | Mapping[str, Tensor],
    state: dict[str, Any],
    first_order: bool = True,
    clip: float | None = None,
    task_dim: bool = False,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    on_gradients: Callable[[list[Tensor | None]], None] | None = None,
) -> Params:
    """One differentiable Adam step on ``params``.

    The moment estimates live in ``state`` as ordinary tensors: with ``first_order=False`` they
    carry the graph of the gradients they were built from, so the query loss differentiates
    through every inner step including the optimizer's state (second-order MAML with Adam).

    Args:
        params: Current tensors.
        loss: Scalar loss computed from ``params``.
        lr: Step size, or a per-tensor mapping (Meta-SGD).
        state: The optimizer state of this inner loop, ``{}`` before the first step; this
            function rebinds its entries ``step``, ``m`` and ``v`` (the tensors themselves are
            never modified in place).
        first_order: Detach the gradients (and hence the state).
        clip: Global-norm threshold for the inner gradient (applied before Adam).
        task_dim: Params carry a leading task dimension (clipping is per task; Adam is
            element-wise, so each task's slice has its own state).
        betas: Adam's ``(beta1, beta2)``.
        eps: Adam's epsilon.
        on_gradients: See :func:`inner_gradients`.

    Returns:
        The updated tensors ``p - lr * m_hat / (sqrt(v_hat) + eps)``.
    """
    if not loss.requires_grad:
        return dict(params)
    grads = inner_gradients(params, loss, first_order=first_order, clip=clip, task_dim=task_dim,
                            on_gradients=on_gradients)
    step = int(state.get("step", 0)) + 1
    moments_m: dict[str, Tensor] = dict(state.get("m", {}))
    moments_v: dict[str, Tensor] = dict(state.get("v", {}))
    new: Params = {}
    for (name, p), g in zip(params.items(), grads):
        if g is None:
            new[name] = p
            continue
        direction, moments_m[name], moments_v[name] = adam_direction(
            g, moments_m.get(name), moments_v.get(name), step, betas, eps
        )
        new[name] = p - _lr_of(lr, name) * direction
    state.update(step=step, m=moments_m, v=moments_v)
    return new


def adapt(
    params: Mapping[str, Tensor],
    support_batch: Batch,
    loss_fn: LossFn,
    steps: int = 1,
    lr: float | Mapping[str, Tensor] = 0.1,
    first_order: bool = True,
    clip: float | None = None,
    task_dim: bool = False,
    losses: list[float] | None = None,
    optimizer: str = "sgd",
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    on_step: Callable[[int, Params], None] | None = None,
    graph_from: int = 0,
    skip_nonfinite: bool = False,
    on_gradients: Callable[[int, list[Tensor | None]], None] | None = None,
) -> Params:
    """Adapt ``params`` to a task with ``steps`` optimizer steps on its support batch.

    This is deltameta's one adaptation function: the meta-train inner loop, ``evaluate``'s
    training methods and ``finetune``'s recorded inner-loop steps all call it.

    The returned tensors are functions of ``params`` (never in-place updates), so a loss on them
    backpropagates to the meta-parameters. Leaf tensors that do not require grad are made to (on
    a detached copy), which lets the same call serve evaluation.

    Args:
        params: Meta-parameters, e.g. ``get_deltas(model)``.
        support_batch: The task's support examples, encoded.
        loss_fn: ``loss_fn(params, batch) -> scalar``, e.g. :func:`lm_loss_fn`.
        steps: Number of inner steps (``0`` returns ``params`` unchanged).
        lr: Inner learning rate, or per-tensor learned rates (Meta-SGD).
        first_order: Drop second-order terms (see :func:`sgd_step`).
        clip: Inner gradient global-norm clipping threshold (per task when ``task_dim``).
        task_dim: Params carry a leading task dimension and ``loss_fn`` returns the sum of
            per-task losses (see :func:`lm_loss_fn` with ``groups``).
        losses: If given, each step's support loss (a float) is appended.
        optimizer: ``sgd`` or ``adam`` (differentiable state, fresh for every call; see
            :func:`adam_step`).
        betas: Adam's ``(beta1, beta2)`` (``adam`` only).
        eps: Adam's epsilon (``adam`` only).
        on_step: Called as ``on_step(k, current)`` after ``k`` steps, for ``k = 0 .. steps``
            (``k = 0`` before the first), e.g. to score intermediate steps; it must not modify
            ``current``.
        graph_from: With ``first_order=False``, the inner gradients of the steps before this
            (0-based) step are detached all the same. Exact Meta-SGD rate gradients use 1: the
            first step's gradient does not depend on the rates, so its graph is not needed.
        skip_nonfinite: A step that would make any tensor non-finite is skipped (the tensors stay
            as they were), as an optimizer that checks its update would; for evaluation and
            fine-tuning, where one diverging step must not turn the adapter into NaN. Off in
            meta-training, whose outer loop rolls back non-finite steps itself.
        on_gradients: Called as ``on_gradients(k, grads)`` with step ``k``'s (0-based) support-loss
            gradients, before clipping and detached, in the order of ``params`` (``None`` where
            the loss does not depend on a tensor). The meta-learners' ``init_loss_weight`` reuses
            step 0's: the gradient of the support loss at the meta-parameters.

    Returns:
        The adapted ``name -> tensor`` dict.

    Raises:
        ConfigError: unknown ``optimizer``.
    """
    if optimizer not in INNER_OPTIMIZERS:
        raise ConfigError(f"inner optimizer {optimizer!r}: expected one of {', '.join(INNER_OPTIMIZERS)}.")
    state: dict[str, Any] = {}
    current: Params = {}
    for name, p in params.items():
        current[name] = p if p.requires_grad else p.detach().requires_grad_(True)
    with torch.enable_grad():
        for step in range(steps):
            if on_step is not None:
                on_step(step, current)
            loss = loss_fn(current, support_batch)
            if losses is not None:
                losses.append(float(loss.detach()))
            detach = first_order or step < graph_from
            previous = current
            hook = None if on_gradients is None else functools.partial(on_gradients, step)
            if optimizer == "adam":
                current = adam_step(current, loss, lr, state, first_order=detach, clip=clip, task_dim=task_dim,
                                    betas=betas, eps=eps, on_gradients=hook)
            else:
                current = sgd_step(current, loss, lr, first_order=detach, clip=clip, task_dim=task_dim,
                                   on_gradients=hook)
            if skip_nonfinite and not all(bool(torch.isfinite(v).all()) for v in current.values()):
                current = previous
    if on_step is not None:
        on_step(steps, current)
    return current


@contextlib.contextmanager
def math_attention(enabled: bool = True) -> Iterator[None]:
    """Run scaled-dot-product attention with the math backend (needed for double backward).

    PyTorch's fused CPU SDPA kernel has no double backward, so second-order MAML runs attention
    under this context.

    Args:
        enabled: When ``False``, this is a no-op.
    """
    if not enabled:
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield
