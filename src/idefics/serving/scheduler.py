"""Admission: a bounded FIFO of waiting requests, admitted between decode steps within a prefill token budget.

The engine decodes its running rows first, then takes the requests to prefill together: in arrival order, while
their choices fit the free slots and the batch's padded prompt positions fit the prefill token budget (the first
request of a step is admitted even when its prompt alone exceeds the budget, so a long prompt cannot starve). A
request never overtakes an earlier one. The caller holds the engine's lock.
"""

from __future__ import annotations

from collections import deque

from .params import EngineOverloaded
from .requests import Request


class Scheduler:
    def __init__(self, *, max_queue: int, prefill_token_budget: int):
        self.max_queue = max_queue
        self.prefill_token_budget = prefill_token_budget
        self.waiting: deque[Request] = deque()

    def add(self, request: Request) -> None:
        """Queue a request; EngineOverloaded when `max_queue` are already waiting."""
        if len(self.waiting) >= self.max_queue:
            raise EngineOverloaded(
                f"the engine is overloaded: {len(self.waiting)} requests are waiting (max_queue={self.max_queue})"
            )
        self.waiting.append(request)

    def remove(self, request: Request) -> bool:
        """Take a request out of the queue (a cancellation); False when it is not waiting."""
        try:
            self.waiting.remove(request)
        except ValueError:
            return False
        return True

    def admit(self, *, free_slots: int, cost) -> list[Request]:
        """The requests to prefill now, in arrival order: while their choices fit the free slots and `cost` (the
        positions prefilling these requests together costs) stays within the budget. The head is always taken when its
        choices fit, so a long prompt cannot starve."""
        batch: list[Request] = []
        while self.waiting:
            head = self.waiting[0]
            if head.params.n > free_slots:
                break
            if batch and cost([*batch, head]) > self.prefill_token_budget:
                break
            batch.append(self.waiting.popleft())
            free_slots -= head.params.n
        return batch
