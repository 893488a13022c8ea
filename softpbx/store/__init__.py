"""State in SQLite: the typed interface the shell uses (:class:`~.api.Store`), its SQLite
implementation (:mod:`.sqlite`) and the webhook outbox table (:mod:`.outbox`)."""

from .api import Store

__all__ = ["Store"]
