"""ShardedEngine: streams sharded across Ray actors, one ``Engine`` per actor (optional extra ``ray``).

Install with ``pip install streamgru[ray]``. Everything except :func:`shard_of` needs Ray, which
is imported only when an engine starts (``import streamgru.cluster`` works without it).

Modules: :mod:`~streamgru.cluster.placement` (which shard holds a key: :func:`shard_of`, no Ray)
and :mod:`~streamgru.cluster.sharded` (:class:`ShardedEngine`, its actors, failures and
snapshots). The cluster's benchmark is harness code: :mod:`streamgru.harness.cluster_bench`.

>>> from streamgru.cluster import shard_of
>>> shard_of(["sensor-1", "sensor-2"], 1).tolist()
[0, 0]
"""

from .placement import shard_of
from .sharded import MANIFEST_FORMAT, ShardedEngine, ShardLostError, StepFuture, start_local_ray

__all__ = ["ShardedEngine", "ShardLostError", "StepFuture", "shard_of", "start_local_ray",
           "MANIFEST_FORMAT"]
