"""Running and verifying a plan on Ray: a driver, one actor per worker slot, large shards in parts.
Importing this package imports ray."""

from rewriter.exec.distributed.ray_executor import execute_on_ray
from rewriter.exec.distributed.ray_verify import verify_on_ray

__all__ = ["execute_on_ray", "verify_on_ray"]
