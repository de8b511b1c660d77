"""`modelship predict --engine ray`: score millions of images on a Ray cluster with the bundle's own preprocessing.

The driver lists the sources (folders by the rules local `predict` reads them with, listings line by line, and
object-storage prefixes through pyarrow's filesystems) into rows of (path as shown, where to read it); Ray Data
streams them through a pool of actors (`map_batches`), each of which holds the bundle's artifact, reads its files,
decodes and preprocesses them with `modelship.preprocess`, runs them in batches and turns the logits into rows with
`modelship.scores`: a row equals local predict's. A file that cannot be read or decoded becomes an error row, never
a failed task. The driver takes the rows as they come (`iter_batches`) and writes them to a folder beside OUT,
renamed to OUT once every row is in: a failed run leaves nothing half-written.

Only the paths go through the driver and the object store; images are read by the actors, a batch at a time, so
memory stays flat however many files there are. Actors and the driver bind to loopback for a cluster started for
the run (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps Ray from swapping 127.0.0.1 for the machine's address).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
import time
from typing import Any

from modelship.errors import DataError
from modelship.manifest import check_bundle, require_artifact
from modelship.options import PredictConfig
from modelship.scale.cluster import connect, pool
from modelship.scale.output import ERRORS, Output, finish, staging
from modelship.scale.scorer import Scorer
from modelship.scale.sources import sources
from modelship.scores import default_top_k

log = logging.getLogger(__name__)


def score(cfg: PredictConfig) -> int:
    """Every source's images through the bundle on the cluster into cfg.output; 0 when all were scored, 1 when some
    could not be (named in OUT/_errors.csv)."""
    assert cfg.bundle is not None and cfg.output is not None
    start = time.perf_counter()
    manifest = check_bundle(cfg.bundle)
    require_artifact(manifest, cfg.bundle, cfg.backend)
    files = sources(cfg.paths)
    classes = manifest["classes"]
    top_k = min(cfg.top_k, len(classes)) if cfg.top_k else default_top_k(len(classes))
    ray = connect(cfg.address)
    folder, out = None, None
    try:
        actors, cpus, gpus = pool(ray, cfg)
        ds = dataset(cfg, manifest, files, top_k, (actors, cpus, gpus))
        folder = staging(cfg.output)
        out = Output(folder, cfg.output_format, cfg.logits)
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for row, error, path in zip(batch["row"], batch["error"], batch["path"], strict=True):
                if error:
                    out.error(str(path), str(error))
                else:
                    out.add(json.loads(row))
        out.close()
        finish(folder, cfg.output)
        folder = None
    except ray.exceptions.RayError as e:
        raise DataError(f"the Ray job failed: {str(e).strip().splitlines()[-1]}") from None
    finally:
        if folder is not None:  # the run failed or was interrupted: nothing of it stays
            if out is not None:
                out.close()
            shutil.rmtree(folder, ignore_errors=True)
        ray.shutdown()
    assert out is not None
    seconds = time.perf_counter() - start
    total = out.scored + out.bad
    bad = f"{out.bad} bad file(s), listed in {cfg.output / ERRORS}" if out.bad else "0 bad files"
    print(f"modelship predict: {total} images in {seconds:.1f} s ({total / seconds:.1f} images/s) on {actors} "
          f"actor(s), {out.scored} scored, {bad}: {cfg.output}", file=sys.stderr)  # fmt: skip
    return 1 if out.bad else 0


def dataset(cfg: PredictConfig, manifest: dict[str, Any], files: list[tuple[str, str]], top_k: int,
            sizing: tuple[int, int, int]) -> Any:  # fmt: skip
    """The plan: the files' rows through a pool of Scorer actors (`sizing`: actors, CPUs and GPUs each), the
    artifact's bytes put in the object store once for all of them (Ray is connected)."""
    import ray
    import ray.data

    assert cfg.bundle is not None
    actors, cpus, gpus = sizing
    artifact = [ray.put((cfg.bundle / manifest["artifacts"][cfg.backend]["path"]).read_bytes())]
    threads = max(1, math.ceil(int(ray.cluster_resources().get("CPU", 1)) / actors))
    log.info("scoring %d images on %d actor(s) (%d CPU, %d GPU each)", len(files), actors, cpus, gpus)
    return ray.data.from_items([{"path": p, "location": loc} for p, loc in files]).map_batches(
        Scorer,
        batch_size=cfg.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cpus,
        num_gpus=gpus,
        fn_constructor_kwargs=dict(
            manifest=manifest,
            backend=cfg.backend,
            artifact=artifact,
            threads=threads,
            device="cuda:0" if gpus else "cpu",
            top_k=top_k,
            logits=cfg.logits,
        ),
    )
