"""Meta-learning algorithms over delta tensors: FOMAML, MAML, Reptile, Meta-SGD, baselines.

Each algorithm turns one task (a support and a query batch) — or, task-batched, T tasks at once
— into a contribution to the meta-gradient, accumulated into the ``.grad`` of the
meta-parameters (deltas, Meta-SGD learning rates, controller), and reports the task's losses.
The outer optimizer step is the trainer's business (:mod:`deltameta.meta.trainer`).

* ``fomaml`` (default): inner SGD with detached gradients; the query-loss gradient at the
  adapted weights is the meta-gradient.
* ``maml``: the same with ``create_graph=True`` (exact second-order meta-gradient); attention
  runs with the math SDPA backend, which has a double backward on CPU.
* ``reptile``: meta-gradient ``phi - phi_adapted`` (an outer SGD step of size ``eps`` moves
  ``phi`` by ``eps (phi_adapted - phi)``).
* ``metasgd``: like (FO)MAML, with learned inner learning rates, one per delta tensor
  (``metasgd_rates="tensor"``) or one per element (``"element"``, as in Li et al. 2017). The
  rates' gradient is exact by default even when the deltas' gradient is first-order (see
  :class:`MetaSGD`).
* ``multitask``: the baseline — the same adapter trained on the same tasks' examples with plain
  batches and the same number of forward/backward passes (``inner_steps + 1`` per task), no
  adaptation.
* ``none``: the fresh-adapter baseline — no meta-training at all; the trainer only validates and
  exports the freshly initialised adapter.

The inner optimizer is SGD or Adam (``InnerLoop.optimizer``; Adam's state is differentiable, so
it works with second-order MAML too).

Every meta-learner can add the support loss at the meta-parameters to its outer objective,
``L_query(φ_K) + λ L_support(φ_0)`` (``init_loss_weight`` λ), so that the initialisation itself
stays a good adapter before any step. Its gradient, ``λ ∇L_support(φ_0)``, is the first inner
step's gradient before clipping, which the inner loop computes anyway: the term costs no pass, and
the multitask twin's pass count stays the meta-learner's.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, ContextManager, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from deltameta.errors import ConfigError
from deltameta.meta import batched as B
from deltameta.meta import functional as F

ALGORITHMS = ("fomaml", "maml", "reptile", "metasgd", "multitask", "none")
#: Shapes of Meta-SGD's learned rates: one per delta tensor, or one per element.
METASGD_RATES = ("tensor", "element")
#: Meta-SGD rate gradients with a first-order inner loop.
METASGD_RATE_GRADS = ("exact", "first_order")
#: Name prefix of Meta-SGD's rates in :meth:`MetaAlgorithm.extra_parameters` (then the delta's name).
LR_PREFIX = "metasgd_lr."


@dataclasses.dataclass
class InnerLoop:
    """Inner-loop settings.

    Attributes:
        steps: Optimizer steps on the support batch.
        lr: Inner learning rate (Meta-SGD: the initial value of each learned rate).
        first_order: Drop second-order terms.
        clip: Inner gradient global-norm threshold (``None``/0: off).
        optimizer: ``sgd`` or ``adam`` (state kept in the graph, fresh for every task).
        betas: Adam's ``(beta1, beta2)``.
        eps: Adam's epsilon.
        metasgd_rates: Meta-SGD only: ``tensor`` (one learned rate per delta tensor) or
            ``element`` (one per element).
        metasgd_rate_grad: Meta-SGD only, with a first-order inner loop: ``exact`` (differentiate
            through the inner loop for the rates) or ``first_order`` (treat the inner gradients
            as constants; cheaper, biased from 2 inner steps on).
    """

    steps: int = 1
    lr: float = 0.1
    first_order: bool = True
    clip: float | None = None
    optimizer: str = "sgd"
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    metasgd_rates: str = "tensor"
    metasgd_rate_grad: str = "exact"

    def optimizer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`functional.adapt` that select the optimizer."""
        return {"optimizer": self.optimizer, "betas": tuple(self.betas), "eps": self.eps}


@dataclasses.dataclass
class TaskResult:
    """Losses of one task step (floats, for logging).

    Attributes:
        support_before: Support loss at the meta-parameters (first inner step).
        support_after: Support loss at the last inner step (``nan`` with one step or none).
        query_after: Query loss at the adapted parameters (multitask: at the shared ones).
        tokens: Tokens processed (support x steps + query).
        finite: Whether every loss was finite.
    """

    support_before: float
    support_after: float
    query_after: float
    tokens: int
    finite: bool


def check_init_loss_weight(algorithm: str, weight: float) -> None:
    """Refuse a negative ``init_loss_weight``, or a positive one for a baseline that does not adapt.

    Raises:
        ConfigError: naming the value and what is valid.
    """
    if not weight >= 0:
        raise ConfigError(f"init_loss_weight={weight}: expected a number >= 0.")
    if weight and algorithm in ("multitask", "none"):
        raise ConfigError(f"init_loss_weight={weight} applies to meta-learners; algorithm={algorithm} does not adapt "
                          "(multitask already trains at the meta-parameters).")


def _count_tokens(batch: Mapping[str, Tensor]) -> int:
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())


class MetaAlgorithm:
    """Base class: owns the meta-parameters and computes per-task meta-gradients.

    Args:
        model: Model with injected deltas (frozen base).
        params: Meta-parameters ``name -> Parameter`` (usually :func:`functional.get_deltas`).
        inner: Inner-loop settings.
        forward_context: Factory of a context manager wrapped around every forward (for
            example autocast); ``None`` for none.
        loss_fn_factory: ``(model, groups) -> loss_fn``; default :func:`functional.lm_loss_fn`.
        init_loss_weight: Weight λ of the support loss at the meta-parameters in the outer
            objective (see the module docstring); it reaches the deltas only (not Meta-SGD's
            rates, on which that loss does not depend, nor a controller's op weights).
    """

    name = "base"
    #: Run the first-order inner loop by updating the delta tensors in place (and restoring them)
    #: instead of through ``functional_call``: needed with gradient checkpointing, whose
    #: recomputation in backward reads the module's own tensors.
    inplace = False

    def __init__(
        self,
        model: nn.Module,
        params: Mapping[str, nn.Parameter],
        inner: InnerLoop,
        forward_context: Callable[[], ContextManager] | None = None,
        loss_fn_factory: Callable[[nn.Module, int | None], F.LossFn] | None = None,
        init_loss_weight: float = 0.0,
    ) -> None:
        check_init_loss_weight(self.name, init_loss_weight)
        self.init_loss_weight = float(init_loss_weight)
        self.model = model
        self.params = dict(params)
        self.inner = inner
        self.forward_context = forward_context or contextlib.nullcontext
        self._loss_fn_factory = loss_fn_factory or (lambda m, groups: F.lm_loss_fn(m, groups=groups))

    # -- meta-parameters -------------------------------------------------------------------

    def extra_parameters(self) -> dict[str, nn.Parameter]:
        """Meta-parameters besides the deltas (Meta-SGD learning rates)."""
        return {}

    def meta_parameters(self) -> dict[str, nn.Parameter]:
        """Every tensor the outer optimizer updates (except the controller's)."""
        return {**self.params, **self.extra_parameters()}

    def inner_lr(self) -> float | Mapping[str, Tensor]:
        """The inner learning rate(s) used by :func:`functional.adapt`."""
        return self.inner.lr

    def after_outer_step(self) -> None:
        """Called by the trainer after every outer optimizer step (Meta-SGD projects its rates)."""

    # -- contexts ----------------------------------------------------------------------------

    def second_order(self) -> bool:
        """Whether the inner loop keeps its graph."""
        return not self.inner.first_order

    @contextlib.contextmanager
    def _context(self) -> Iterator[None]:
        with self.forward_context(), F.math_attention(self.second_order()):
            yield

    def loss_fn(self, groups: int | None = None) -> F.LossFn:
        """The loss closure for an ordinary (``None``) or task-batched (``T``) batch."""
        return self._loss_fn_factory(self.model, groups)

    # -- the step ----------------------------------------------------------------------------

    def adapt(self, params: Mapping[str, Tensor], support: Mapping[str, Tensor], groups: int | None = None,
              losses: list[float] | None = None, first_order: bool | None = None,
              on_gradients: Callable[[int, list[Tensor | None]], None] | None = None) -> dict[str, Tensor]:
        """Adapt ``params`` on ``support`` with this algorithm's inner loop."""
        return F.adapt(
            params,
            support,
            self.loss_fn(groups),
            steps=self.inner.steps,
            lr=self.inner_lr(),
            first_order=self.inner.first_order if first_order is None else first_order,
            clip=self.inner.clip,
            task_dim=groups is not None,
            losses=losses,
            on_gradients=on_gradients,
            **self.inner.optimizer_kwargs(),
        )

    # -- the support loss at the meta-parameters (init_loss_weight) --------------------------

    def _init_hook(self, store: dict[str, Tensor]) -> Callable[[int, list[Tensor | None]], None] | None:
        """An ``on_gradients`` hook that keeps the first inner step's gradients in ``store``.

        ``None`` when ``init_loss_weight`` is 0, so the inner loop is exactly the plain one.
        """
        if not self.init_loss_weight:
            return None
        names = list(self.params)

        def hook(step: int, grads: list[Tensor | None]) -> None:
            if step == 0:
                store.update({n: g for n, g in zip(names, grads) if g is not None})

        return hook

    def _add_init_term(self, store: Mapping[str, Tensor], scale: float, tasks: int | None) -> None:
        """Accumulate ``init_loss_weight * scale * ∇L_support(φ_0)`` into the deltas' ``.grad``."""
        for name, grad in store.items():
            _accumulate(self.params[name], self.init_loss_weight * scale * (grad.sum(0) if tasks is not None else grad))

    def task_step(self, support: Mapping[str, Tensor], query: Mapping[str, Tensor], scale: float) -> TaskResult:
        """Accumulate one task's meta-gradient (times ``scale``) into ``.grad``.

        Args:
            support: Encoded support batch of the task.
            query: Encoded query batch of the task.
            scale: Weight of this task in the meta-batch (usually ``1 / meta_batch_size``).

        Returns:
            The task's losses.
        """
        if self.inplace:
            return self._task_step_inplace(support, query, scale)
        losses: list[float] = []
        init: dict[str, Tensor] = {}
        with self._context():
            fast = self.adapt(self.params, support, losses=losses, on_gradients=self._init_hook(init))
            query_loss = self.loss_fn()(fast, query)
            finite = bool(torch.isfinite(query_loss)) and all(map(_finite, losses))
            if finite:
                self._backward(query_loss * scale, fast, scale)
                self._add_init_term(init, scale, None)
        return self._result(losses, query_loss, support, query, 1)

    def tasks_step_batched(self, supports: Sequence[Mapping[str, Tensor]], queries: Sequence[Mapping[str, Tensor]],
                           scale: float, pad_token_id: int = 0) -> TaskResult:
        """Like :meth:`task_step` for T tasks at once (task-batched); the result averages them."""
        tasks = len(supports)
        support = B.concat_batches(supports, pad_token_id)
        query = B.concat_batches(queries, pad_token_id)
        losses: list[float] = []
        init: dict[str, Tensor] = {}
        with self._context():
            stacked = B.stack_params(self.params, tasks)
            fast = self.adapt(stacked, support, groups=tasks, losses=losses, on_gradients=self._init_hook(init))
            query_loss = self.loss_fn(tasks)(fast, query)
            finite = bool(torch.isfinite(query_loss)) and all(map(_finite, losses))
            if finite:
                self._backward(query_loss * scale, fast, scale, tasks=tasks)
                self._add_init_term(init, scale, tasks)
        return self._result([x / tasks for x in losses], query_loss / tasks, support, query, tasks)

    def _plain_loss(self, batch: Mapping[str, Tensor]) -> Tensor:
        inputs = {k: v for k, v in batch.items() if k in F.MODEL_INPUT_KEYS}
        return F.target_loss(F._logits(self.model(**inputs, use_cache=False)), batch["labels"])

    def _task_step_inplace(self, support: Mapping[str, Tensor], query: Mapping[str, Tensor], scale: float) -> TaskResult:
        """First-order task step that moves the live delta tensors and restores them afterwards."""
        if self.second_order():
            raise ConfigError(f"the in-place inner loop (gradient checkpointing) is first-order only; algorithm={self.name}.")
        names = list(self.params)
        tensors = [self.params[n] for n in names]
        saved = [p.detach().clone() for p in tensors]
        lr = self.inner_lr()
        losses: list[float] = []
        moments: dict[str, tuple[Tensor | None, Tensor | None]] = {}
        init: dict[str, Tensor] = {}
        try:
            with self.forward_context():
                for step in range(1, self.inner.steps + 1):
                    loss = self._plain_loss(support)
                    losses.append(float(loss.detach()))
                    grads = torch.autograd.grad(loss, tensors, allow_unused=True)
                    if step == 1 and self.init_loss_weight:
                        init = {n: g.detach() for n, g in zip(names, grads) if g is not None}
                    grads = F.clip_grads(list(grads), self.inner.clip)
                    with torch.no_grad():
                        for name, p, g in zip(names, tensors, grads):
                            if g is None:
                                continue
                            if self.inner.optimizer == "adam":
                                g, m, v = F.adam_direction(g, *moments.get(name, (None, None)), step,
                                                           tuple(self.inner.betas), self.inner.eps)
                                moments[name] = (m, v)
                            p.sub_((lr[name].detach() if isinstance(lr, Mapping) else lr) * g)
                query_grad = self.name != "reptile"
                if not query_grad:
                    for p in tensors:
                        p.requires_grad_(False)
                try:
                    query_loss = self._plain_loss(query)
                    finite = bool(torch.isfinite(query_loss)) and all(map(_finite, losses))
                    if finite and query_loss.requires_grad:
                        (query_loss * scale).backward()
                finally:
                    for p in tensors:
                        p.requires_grad_(True)
                if finite and not query_grad:
                    diffs = {n: (s - p.detach()) for n, s, p in zip(names, saved, tensors)}
        finally:
            with torch.no_grad():
                for p, s in zip(tensors, saved):
                    p.copy_(s)
        if finite and not query_grad:
            for name, p in self.params.items():
                p.grad = diffs[name] * scale if p.grad is None else p.grad + diffs[name] * scale
        if finite:
            self._add_init_term(init, scale, None)
        return self._result(losses, query_loss, support, query, 1)

    def _backward(self, scaled_query_loss: Tensor, fast: Mapping[str, Tensor], scale: float, tasks: int | None = None) -> None:
        scaled_query_loss.backward()

    def _result(self, losses: list[float], query_loss: Tensor, support, query, tasks: int) -> TaskResult:
        q = float(query_loss.detach())
        return TaskResult(
            support_before=losses[0] if losses else float("nan"),
            support_after=losses[-1] if len(losses) > 1 else float("nan"),
            query_after=q,
            tokens=_count_tokens(support) * max(self.inner.steps, 1) + _count_tokens(query),
            finite=_finite(q) and all(map(_finite, losses)),
        )


def _finite(x: float) -> bool:
    return x == x and x not in (float("inf"), float("-inf"))


class FOMAML(MetaAlgorithm):
    """First-order MAML: gradient of the query loss at the adapted weights."""

    name = "fomaml"


class MAML(MetaAlgorithm):
    """Second-order MAML: differentiates through the inner loop (``create_graph=True``)."""

    name = "maml"


class MetaSGD(MetaAlgorithm):
    """Meta-SGD (Li et al. 2017): learned inner learning rates, meta-learned with the deltas.

    The rates are the parameters themselves (``inner.metasgd_rates``: a scalar per delta tensor,
    or a tensor of the delta's shape for per-element rates), so what :meth:`extra_parameters`
    returns is exactly what the inner loop multiplies the gradient with. They start at
    ``inner.lr`` and are projected onto ``>= 0`` after every outer step
    (:meth:`after_outer_step`, projected AdamW): a learned rate may switch an element's
    adaptation off but never turns a step into gradient ascent.

    Meta-gradients:

    * second-order (``inner.first_order=False``): everything differentiates through the inner loop;
    * first-order with ``inner.metasgd_rate_grad="exact"`` (default): the deltas get the
      first-order gradient ``∇L_query(φ_K)``; the rates get the exact
      ``dL/dα = ∇L_query(φ_K) · ∂φ_K/∂α``, a vector-Jacobian product through an inner loop run
      from the detached deltas whose gradients keep their graph from the second step on (the
      first step's gradient does not depend on the rates). With one inner step this costs what
      the first-order step costs; with K steps, K - 1 double backwards;
    * first-order with ``metasgd_rate_grad="first_order"``: the inner gradients are constants
      for the rates as well (exact for one inner step, biased from two on).
    """

    name = "metasgd"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.inner.metasgd_rates not in METASGD_RATES:
            raise ConfigError(f"metasgd_rates={self.inner.metasgd_rates!r}: expected one of {', '.join(METASGD_RATES)}.")
        if self.inner.metasgd_rate_grad not in METASGD_RATE_GRADS:
            raise ConfigError(f"metasgd_rate_grad={self.inner.metasgd_rate_grad!r}: expected one of "
                              f"{', '.join(METASGD_RATE_GRADS)}.")
        element = self.inner.metasgd_rates == "element"
        self.lrs = {
            name: nn.Parameter(torch.full(tuple(p.shape) if element else (), float(self.inner.lr), dtype=p.dtype,
                                          device=p.device))
            for name, p in self.params.items()
        }

    def extra_parameters(self) -> dict[str, nn.Parameter]:
        """The learned rates as ``{"metasgd_lr.<delta parameter name>": rate}`` (stable names)."""
        return {f"{LR_PREFIX}{name}": lr for name, lr in self.lrs.items()}

    def inner_lr(self) -> Mapping[str, Tensor]:
        return self.lrs

    def after_outer_step(self) -> None:
        with torch.no_grad():
            for lr in self.lrs.values():
                lr.clamp_(min=0.0)

    def exact_rate_grad(self) -> bool:
        """Whether the rates' gradient comes from the dedicated exact path (first-order deltas)."""
        return self.inner.first_order and self.inner.metasgd_rate_grad == "exact"

    def second_order(self) -> bool:
        return not self.inner.first_order or (self.exact_rate_grad() and self.inner.steps > 1)

    def task_step(self, support, query, scale):  # noqa: D102 - see base class
        if self.inplace or not self.exact_rate_grad():
            return super().task_step(support, query, scale)
        losses: list[float] = []
        with self._context():
            start = {k: v.detach() for k, v in self.params.items()}
            query_loss = self._exact_step(start, support, query, scale, None, losses)
        return self._result(losses, query_loss, support, query, 1)

    def tasks_step_batched(self, supports, queries, scale, pad_token_id=0):  # noqa: D102 - see base class
        if not self.exact_rate_grad():
            return super().tasks_step_batched(supports, queries, scale, pad_token_id)
        tasks = len(supports)
        support = B.concat_batches(supports, pad_token_id)
        query = B.concat_batches(queries, pad_token_id)
        losses: list[float] = []
        with self._context():
            start = B.stack_params({k: v.detach() for k, v in self.params.items()}, tasks)
            query_loss = self._exact_step(start, support, query, scale, tasks, losses)
        return self._result([x / tasks for x in losses], query_loss / tasks, support, query, tasks)

    def _exact_step(self, start: Mapping[str, Tensor], support, query, scale: float, tasks: int | None,
                    losses: list[float]) -> Tensor:
        """First-order deltas, exact rates (see the class docstring); returns the query loss."""
        init: dict[str, Tensor] = {}
        fast = F.adapt(start, support, self.loss_fn(tasks), steps=self.inner.steps, lr=self.lrs, first_order=False,
                       graph_from=1, clip=self.inner.clip, task_dim=tasks is not None, losses=losses,
                       on_gradients=self._init_hook(init), **self.inner.optimizer_kwargs())
        at = {k: v.detach().requires_grad_(True) for k, v in fast.items()}
        query_loss = self.loss_fn(tasks)(at, query)
        if not (bool(torch.isfinite(query_loss)) and all(map(_finite, losses))):
            return query_loss
        # the query pass: the controller's direct gradient and v = d(scale * L_query)/d(phi_K)
        (query_loss * scale).backward()
        self._add_init_term(init, scale, tasks)
        names = [k for k, v in at.items() if v.grad is not None]
        for name in names:
            grad = at[name].grad
            _accumulate(self.params[name], grad.sum(0) if tasks is not None else grad)
        # the rates: v^T d(phi_K)/d(alpha) through the inner loop (deltas and controller left alone)
        outputs = [(fast[k], at[k].grad) for k in names if fast[k].requires_grad]
        if outputs:
            rates = list(self.lrs.values())
            grads = torch.autograd.grad([o for o, _ in outputs], rates, grad_outputs=[g for _, g in outputs],
                                        allow_unused=True)
            for lr, grad in zip(rates, grads):
                if grad is not None:
                    _accumulate(lr, grad)
        return query_loss


def _accumulate(p: Tensor, grad: Tensor) -> None:
    p.grad = grad.detach().clone() if p.grad is None else p.grad + grad.detach()


class Reptile(MetaAlgorithm):
    """Reptile: meta-gradient ``phi - phi_adapted`` (first-order inner loop, no query gradient).

    The query loss at the adapted weights is computed for logging and, when a controller is in
    use, back-propagated to the controller only.
    """

    name = "reptile"

    def task_step(self, support, query, scale):  # noqa: D102 - see base class
        if self.inplace:
            return self._task_step_inplace(support, query, scale)
        losses: list[float] = []
        init: dict[str, Tensor] = {}
        with self._context():
            fast = self.adapt(self.params, support, losses=losses, first_order=True, on_gradients=self._init_hook(init))
            frozen = {k: v.detach() for k, v in fast.items()}
            query_loss = self.loss_fn()(frozen, query)
            finite = bool(torch.isfinite(query_loss)) and all(map(_finite, losses))
            if finite:
                self._reptile_grad(frozen, scale, None)
                self._add_init_term(init, scale, None)
                if query_loss.requires_grad:
                    (query_loss * scale).backward()
        return self._result(losses, query_loss, support, query, 1)

    def tasks_step_batched(self, supports, queries, scale, pad_token_id=0):  # noqa: D102
        tasks = len(supports)
        support = B.concat_batches(supports, pad_token_id)
        query = B.concat_batches(queries, pad_token_id)
        losses: list[float] = []
        init: dict[str, Tensor] = {}
        with self._context():
            fast = self.adapt(B.stack_params(self.params, tasks), support, groups=tasks, losses=losses, first_order=True,
                              on_gradients=self._init_hook(init))
            frozen = {k: v.detach() for k, v in fast.items()}
            query_loss = self.loss_fn(tasks)(frozen, query)
            finite = bool(torch.isfinite(query_loss)) and all(map(_finite, losses))
            if finite:
                self._reptile_grad(frozen, scale, tasks)
                self._add_init_term(init, scale, tasks)
                if query_loss.requires_grad:
                    (query_loss * scale).backward()
        return self._result([x / tasks for x in losses], query_loss / tasks, support, query, tasks)

    def _reptile_grad(self, fast: Mapping[str, Tensor], scale: float, tasks: int | None) -> None:
        for name, p in self.params.items():
            target = fast[name]
            diff = (p.detach() - target) if tasks is None else (tasks * p.detach() - target.sum(0))
            p.grad = diff * scale if p.grad is None else p.grad + diff * scale


class Multitask(MetaAlgorithm):
    """Multitask baseline: plain training of the same adapter on the same tasks' examples.

    Per task it runs ``inner_steps`` forward/backward passes on the support batch and one on the
    query batch (the same number of passes as the meta-learners), all accumulating into the same
    outer gradient, without any adaptation.
    """

    name = "multitask"

    def second_order(self) -> bool:
        return False

    def task_step(self, support, query, scale):  # noqa: D102 - see base class
        losses, query_loss = self._passes(self.loss_fn(), support, query, scale, 1)
        return self._result(losses, query_loss, support, query, 1)

    def tasks_step_batched(self, supports, queries, scale, pad_token_id=0):  # noqa: D102
        tasks = len(supports)
        support = B.concat_batches(supports, pad_token_id)
        query = B.concat_batches(queries, pad_token_id)
        losses, query_loss = self._passes(self.loss_fn(tasks), support, query, scale, tasks)
        return self._result(losses, query_loss / tasks, support, query, tasks)

    def _passes(self, loss_fn: F.LossFn, support, query, scale: float, tasks: int) -> tuple[list[float], Tensor]:
        """``inner_steps`` passes on the support batch and one on the query batch, each back-propagated.

        The controller's op weights (if any) are shared by all passes, so every backward but
        the last keeps the graph.
        """
        passes = self.inner.steps + 1
        losses: list[float] = []
        with self._context():
            for _ in range(self.inner.steps):
                loss = loss_fn(self.params, support)
                losses.append(float(loss.detach()) / tasks)
                if _finite(losses[-1]):
                    (loss * scale / passes).backward(retain_graph=True)
            query_loss = loss_fn(self.params, query)
            if torch.isfinite(query_loss) and all(map(_finite, losses)):
                (query_loss * scale / passes).backward()
        return losses, query_loss


class NoMetaTraining(MetaAlgorithm):
    """The fresh-adapter baseline (``algorithm=none``): no meta-training at all.

    The trainer runs no outer step with it; it only validates the freshly initialised adapter
    (adapting it with the same inner loop as the meta-learners) and exports it, so that a
    ``none`` run directory can be evaluated exactly like a meta-trained one.
    """

    name = "none"

    def task_step(self, support, query, scale):  # noqa: D102 - see base class
        raise ConfigError("algorithm=none does no meta-training; it has no meta-gradient to compute.")

    def tasks_step_batched(self, supports, queries, scale, pad_token_id=0):  # noqa: D102
        raise ConfigError("algorithm=none does no meta-training; it has no meta-gradient to compute.")


def _mean_results(results: Sequence[TaskResult]) -> TaskResult:
    n = len(results)
    return TaskResult(
        support_before=sum(r.support_before for r in results) / n,
        support_after=sum(r.support_after for r in results) / n,
        query_after=sum(r.query_after for r in results) / n,
        tokens=sum(r.tokens for r in results),
        finite=all(r.finite for r in results),
    )


_CLASSES: dict[str, type[MetaAlgorithm]] = {
    "fomaml": FOMAML,
    "maml": MAML,
    "reptile": Reptile,
    "metasgd": MetaSGD,
    "multitask": Multitask,
    "none": NoMetaTraining,
}


def make_algorithm(
    name: str,
    model: nn.Module,
    params: Mapping[str, nn.Parameter],
    inner: InnerLoop,
    forward_context: Callable[[], ContextManager] | None = None,
    loss_fn_factory: Callable[[nn.Module, int | None], F.LossFn] | None = None,
    init_loss_weight: float = 0.0,
) -> MetaAlgorithm:
    """Build an algorithm by name.

    Args:
        name: One of :data:`ALGORITHMS`.
        model: Model with injected deltas.
        params: Meta-parameters.
        inner: Inner-loop settings (``maml`` forces ``first_order=False``; ``fomaml``,
            ``reptile``, ``multitask`` and ``none`` force ``True``).
        forward_context: See :class:`MetaAlgorithm`.
        loss_fn_factory: See :class:`MetaAlgorithm`.
        init_loss_weight: See :class:`MetaAlgorithm`; meta-learners only.

    Raises:
        ConfigError: unknown name or inner optimizer, or ``init_loss_weight > 0`` for a baseline.
    """
    if name not in _CLASSES:
        raise ConfigError(f"algorithm={name!r}: expected one of {', '.join(ALGORITHMS)}.")
    if inner.optimizer not in F.INNER_OPTIMIZERS:
        raise ConfigError(f"inner optimizer {inner.optimizer!r}: expected one of {', '.join(F.INNER_OPTIMIZERS)}.")
    inner = dataclasses.replace(inner)
    if name == "maml":
        inner.first_order = False
    elif name in ("fomaml", "reptile", "multitask", "none"):
        inner.first_order = True
    return _CLASSES[name](model, params, inner, forward_context, loss_fn_factory, init_loss_weight)


def evaluate_task(
    algorithm: MetaAlgorithm,
    support: Mapping[str, Tensor],
    query: Mapping[str, Tensor],
    steps: int | None = None,
) -> tuple[float, float]:
    """Query loss of a held-out task before and after adaptation (no meta-gradient).

    Args:
        algorithm: The trained algorithm (its inner lr(s) are used; the inner loop runs first
            order since no meta-gradient is needed).
        support: Encoded support batch.
        query: Encoded query batch.
        steps: Inner steps (default: the algorithm's; the ``multitask`` and ``none`` baselines
            adapt with the same inner loop so that they are compared fairly).

    Returns:
        ``(query_loss_before, query_loss_after)``.
    """
    loss_fn = algorithm.loss_fn()
    base = {k: v.detach() for k, v in algorithm.params.items()}
    lr = algorithm.inner_lr()
    if isinstance(lr, Mapping):
        lr = {k: v.detach() for k, v in lr.items()}
    with algorithm.forward_context():
        with torch.no_grad():
            before = float(loss_fn(base, query))
        fast = F.adapt(base, support, loss_fn, steps=algorithm.inner.steps if steps is None else steps, lr=lr,
                       first_order=True, clip=algorithm.inner.clip, **algorithm.inner.optimizer_kwargs())
        with torch.no_grad():
            after = float(loss_fn({k: v.detach() for k, v in fast.items()}, query))
    return before, after
