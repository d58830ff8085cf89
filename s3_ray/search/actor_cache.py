"""Keep Tune's idle trial actors across S3 stage boundaries (a workaround for ray 2.60).

With ``reuse_actors=True`` Tune caches the actor of a finished trial only for a trial that is already
staged, plus one spare globally (``_ObjectCache(may_keep_one=True)`` in
``ray/tune/execution/tune_controller.py``). At an S3 stage boundary the searcher answers ``None``
until every result of the stage is in, so every actor but one is stopped. Afterwards each new
trial gets a fresh actor, which takes seconds to start (torch, the model, the reference statistics),
while the surviving actor finishes its trial in under a second and is handed the waiting trial
instead; the fresh actor is cancelled, and the search runs one trial at a time until the end
(measured: after the first boundary every trial ran in one process, on one node of two).

``keep_idle_trial_actors(n)`` lets the cache hold up to ``n`` idle actors (the search's concurrency),
so the next stage starts on all of them. Cached actors are still flushed when the search is over.
Process-wide (the driver runs one Tuner); set ``S3_TUNE_KEEP_IDLE_ACTORS=0`` to turn it off.
"""

from __future__ import annotations

import os


def keep_idle_trial_actors(n: int) -> bool:
    """Install the cache policy for Tuners created from now on; returns whether it is active."""
    if n <= 1 or os.environ.get("S3_TUNE_KEEP_IDLE_ACTORS", "1") == "0":
        return False
    import ray.tune.execution.tune_controller as tc
    from ray.tune.utils.object_cache import _ObjectCache

    class KeepIdleActors(_ObjectCache):
        keep = n

        def cache_object(self, key, obj) -> bool:
            if len(self._cached_objects[key]) >= self._max_num_objects[key] and self._num_cached_objects >= self.keep:
                return False
            self._cached_objects[key].append(obj)
            self._num_cached_objects += 1
            return True

        def flush_cached_objects(self, force_all: bool = False):
            for key, objs in self._cached_objects.items():
                keep = 0 if force_all else max(self._max_num_objects[key], self.keep)
                while len(objs) > keep:
                    self._num_cached_objects -= 1
                    yield objs.pop(0)

    tc._ObjectCache = KeepIdleActors
    return True
