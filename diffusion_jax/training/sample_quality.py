"""``--mode=fid_stats`` and ``--mode=fid``: sample quality of a workdir's checkpoint.

``fid_stats`` streams a data split (``fid.split``, at most ``fid.num_examples`` examples,
without flips) through the feature network and writes pytorch-fid's statistics file
(``mu``, ``sigma``) with, beside them, the first ``fid.max_features`` feature vectors (for
KID and precision/recall; pytorch-fid ignores them). ``fid`` draws ``fid.num_samples``
samples from the latest checkpoint's EMA parameters with ``config.sample``'s sampler and
steps, streams their features (statistics in float64, memory independent of N except the
kept vectors and Inception logits) and appends FID, KID, precision/recall and (Inception
only) the Inception Score to ``metrics.jsonl``, with the sampler, its steps and N.

Networks (``fid.network``): 'inception' (pytorch-fid's FID Inception; weights from
``fid.weights``, see `diffusion_jax.metrics.weights`; grey images are repeated to RGB as
pytorch-fid's reader does) or 'digits' (the offline digits classifier: keys are prefixed
``digits_`` so that its numbers are never read as Inception FID).
"""

from __future__ import annotations

import json
import logging
import time
from typing import NamedTuple

import jax
import ml_collections
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from diffusion_jax import data
from diffusion_jax.metrics import digits, features, fid, inception, inception_score, kid
from diffusion_jax.metrics import precision_recall, weights
from diffusion_jax.training import evaluate, mesh as mesh_lib

__all__ = ["NETWORKS", "compute_reference_statistics", "fid_of_checkpoint", "log_digits_fid"]

NETWORKS = ("inception", "digits")


class FeatureNetwork(NamedTuple):
    name: str
    extractor: features.FeatureExtractor
    channels: int  # what the network takes; grey images are repeated to 3 for Inception
    feature_key: str
    logits_key: str | None  # for the Inception Score
    prefix: str  # of the metric names: '' (Inception) or 'digits_'


def _check_fid_config(fid_config) -> None:
    for field in ("num_examples", "num_samples", "batch_size", "kid_subsets",
                  "kid_subset_size"):
        value = fid_config[field]
        if isinstance(value, bool) or not isinstance(value, int) or value < 2 - (
                field in ("batch_size", "kid_subsets")):
            raise ValueError(f"fid.{field} must be an int >= "
                             f"{2 - (field in ('batch_size', 'kid_subsets'))}; got {value!r}.")


def feature_network(config: ml_collections.ConfigDict) -> FeatureNetwork:
    _check_fid_config(config.fid)
    name = config.fid.network
    if name not in NETWORKS:
        raise ValueError(f"fid.network must be one of {NETWORKS}; got {name!r}.")
    if name == "inception":
        variables = weights.load_inception_variables(config.fid.weights)
        extractor = features.FeatureExtractor(inception.InceptionV3().apply, variables,
                                              config.fid.batch_size)
        return FeatureNetwork(name, extractor, 3, "pool", "logits_unbiased", "")
    classifier = digits.train_digits_classifier()
    logging.info("Digits network: held-out accuracy %.4f.", classifier.held_out_accuracy)
    extractor = features.FeatureExtractor(digits.apply_digits_net, classifier.params,
                                          config.fid.batch_size)
    return FeatureNetwork(name, extractor, 1, "features", None, "digits_")


def _network_input(images01: np.ndarray, network: FeatureNetwork) -> np.ndarray:
    if network.channels == 3 and images01.shape[-1] == 1:
        images01 = np.repeat(images01, 3, axis=-1)
    return features.to_unit_range(images01, channels=network.channels)


class _Progress:
    """Logs done/total, the rate and the ETA, at most every ``every`` seconds and at the end."""

    def __init__(self, what: str, total: int, every: float = 10.0):
        self.what, self.total, self.every = what, total, every
        self.start = self.last = time.time()

    def update(self, done: int):
        now = time.time()
        if now - self.last < self.every and done < self.total:
            return
        self.last, elapsed = now, now - self.start
        eta = elapsed / max(done, 1) * (self.total - done)
        logging.info("%s: %d/%d (%.1f/s, ETA %.0f s)", self.what, done, self.total,
                     done / max(elapsed, 1e-9), eta)


class _Accumulator:
    """Running statistics of the features, the first ``keep`` vectors, all logits."""

    def __init__(self, network: FeatureNetwork, keep: int):
        self.network, self.keep = network, keep
        self.stats, self.kept, self.logits = None, [], []

    def add(self, images01: np.ndarray) -> None:
        out = self.network.extractor(_network_input(images01, self.network))
        f = out[self.network.feature_key]
        if self.stats is None:
            self.stats = fid.RunningStatistics(f.shape[1])
        self.stats.update(f)
        room = self.keep - sum(len(k) for k in self.kept)
        if room > 0:
            self.kept.append(np.asarray(f[:room], np.float32))
        if self.network.logits_key is not None:
            self.logits.append(np.asarray(out[self.network.logits_key], np.float32))

    def kept_features(self) -> np.ndarray:
        return np.concatenate(self.kept) if self.kept else np.zeros((0, 0), np.float32)


def _default_stats_path(config, workdir) -> epath.Path:
    return (epath.Path(workdir) /
            f"fid_stats_{config.fid.network}_{config.data.name}_{config.fid.split}.npz")


def _stats_path(config, workdir) -> epath.Path:
    return epath.Path(config.fid.stats) if config.fid.stats else _default_stats_path(
        config, workdir)


def compute_reference_statistics(config: ml_collections.ConfigDict, workdir) -> epath.Path:
    """``--mode=fid_stats``: writes the statistics of ``fid.split``; returns the path
    (``fid.stats``, default ``workdir/fid_stats_{network}_{data}_{split}.npz``; an
    existing file is never overwritten)."""
    path = _stats_path(config, workdir)
    if path.exists():
        raise FileExistsError(f"{path} exists; remove it or set --config.fid.stats to "
                              "another path.")
    network = feature_network(config)
    data_config = ml_collections.ConfigDict(config.data.to_dict())
    data_config.split, data_config.random_flip = config.fid.split, False
    info = data.dataset_info(data_config)
    if info.kind != "image":
        raise ValueError(f"FID needs image data; {config.data.name!r} is {info.kind} data.")
    available = info.num_examples or config.fid.num_examples
    total = min(config.fid.num_examples, available)
    batch = network.extractor.batch_size
    batch_fn = data.make_batch_fn(data_config, per_process_batch=batch, seed=config.seed,
                                  process_index=0, process_count=1)
    acc, progress, done = _Accumulator(network, config.fid.max_features), _Progress(
        "reference features", total), 0
    for step in range(-(-total // batch)):  # the first epoch: each example once
        images = np.asarray(batch_fn(step)["image"])[:total - done]
        acc.add((images + 1.0) / 2.0)
        done += images.shape[0]
        progress.update(done)
    mu, sigma = acc.stats.statistics()
    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        fid.save_statistics(path, mu, sigma, features=acc.kept_features(),
                            num_examples=np.int64(done), network=np.str_(network.name))
        logging.info("Wrote the %s statistics of %d examples of %s/%s to %s.", network.name,
                     done, config.data.name, config.fid.split, path)
    return path


def _reference(path: epath.Path):
    mu, sigma = fid.load_statistics(path)
    with np.load(path) as f:
        ref_features = f["features"] if "features" in f.files else None
        network = str(f["network"]) if "network" in f.files else None
    return mu, sigma, ref_features, network


def _draw_samples(config, workdir, network: FeatureNetwork, keep: int):
    state, objective, info, mesh = evaluate.restore_for_inference(config, workdir)
    if objective.sample is None:
        raise ValueError(f"Objective {config.objective!r} has no sampler for {info.kind} data.")
    total = config.fid.num_samples
    batch = -(-min(config.sample.batch_size, total) // mesh.size) * mesh.size
    draw = jax.jit(lambda params, key: objective.sample(params, key, batch),
                   out_shardings=mesh_lib.data_sharded(mesh))
    key = jax.random.fold_in(jax.random.key(config.seed + 1), int(state.step))
    acc, progress, done, i = _Accumulator(network, keep), _Progress("FID samples", total), 0, 0
    while done < total:
        samples = draw(state.ema_params, jax.random.fold_in(key, i))
        samples = np.asarray(multihost_utils.process_allgather(samples, tiled=True))
        samples = samples[:total - done]
        acc.add(features.samples_to_unit_range(samples))
        done, i = done + samples.shape[0], i + 1
        progress.update(done)
    return acc, int(state.step)


def fid_of_checkpoint(config: ml_collections.ConfigDict, workdir) -> dict:
    """``--mode=fid``: FID (and KID, precision/recall, IS) of ``fid.num_samples`` samples
    against the statistics file; appends the results to ``metrics.jsonl``, returns them."""
    path = _stats_path(config, workdir)
    if not path.exists():
        raise FileNotFoundError(f"No reference statistics {path}: run --mode=fid_stats first "
                                "(same config), or set --config.fid.stats to a pytorch-fid "
                                "statistics .npz.")
    mu_ref, sigma_ref, ref_features, ref_network = _reference(path)
    if ref_network is not None and ref_network != config.fid.network:
        raise ValueError(f"{path} holds {ref_network} statistics, but fid.network is "
                         f"{config.fid.network!r}.")
    network = feature_network(config)
    acc, step = _draw_samples(config, workdir, network, config.fid.max_features)
    mu, sigma = acc.stats.statistics()
    p = network.prefix
    steps = (config.sample.num_steps if config.sample.sampler != "ancestral"
             else config.diffusion.num_timesteps)
    results = {"step": step, "feature_network": network.name,
               "sampler": config.sample.sampler, "sampler_steps": int(steps),
               "num_samples": int(acc.stats.count), "reference": str(path),
               f"{p}fid": fid.frechet_distance(mu, sigma, mu_ref, sigma_ref)}
    results |= _set_metrics(config, acc.kept_features(), ref_features, p)
    if acc.logits:
        is_mean, is_std = inception_score.inception_score(np.concatenate(acc.logits))
        results |= {"inception_score": is_mean, "inception_score_std": is_std}
    logging.info("Sample quality: %s", ", ".join(f"{k}={v}" for k, v in results.items()))
    if jax.process_index() == 0:
        with (epath.Path(workdir) / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(results) + "\n")
    return results


def _set_metrics(config, generated, reference, p: str) -> dict:
    """KID and precision/recall, where the statistics file holds feature vectors."""
    if reference is None or len(reference) < 4 or len(generated) < 4:
        logging.info("KID and precision/recall need feature vectors in the statistics file "
                     "(--mode=fid_stats keeps them); skipped.")
        return {}
    kid_mean, kid_std = kid.kernel_inception_distance(
        generated, reference, num_subsets=config.fid.kid_subsets,
        subset_size=config.fid.kid_subset_size, seed=config.seed)
    precision, recall = precision_recall.precision_recall(reference, generated, k=3)
    return {f"{p}kid": kid_mean, f"{p}kid_std": kid_std, f"{p}precision": precision,
            f"{p}recall": recall}


def log_digits_fid(samples, step: int, metric_writer) -> dict | None:
    """Digits FID of a training run's samples (in [-1, 1]) and its floor
    (`digits.digits_fid_report`), logged and written with the step's scalars; None (and a
    log line) where the images are not the digits' grey 8k x 8k or there are too few for a
    covariance of the 64-d features."""
    if len(samples) <= digits.FEATURE_DIM:
        logging.info("No digits FID: %d samples, more than %d needed.", len(samples),
                     digits.FEATURE_DIM)
        return None
    try:
        report = digits.digits_fid_report(features.samples_to_unit_range(np.asarray(samples)))
    except ValueError as e:
        logging.info("No digits FID for these samples: %s", e)
        return None
    logging.info("Digits FID (digits classifier features, not Inception FID) of %d samples "
                 "vs half of the training digits: %.2f; floor (%d digits of the other half): "
                 "%.2f +- %.2f. Vs the held-out digits (other writers): %.2f (training "
                 "digits: %.2f). Classifier held-out accuracy %.3f.",
                 report["digits_fid_num_samples"], report["digits_fid"],
                 report["digits_fid_floor_num"], report["digits_fid_floor"],
                 report["digits_fid_floor_std"], report["digits_fid_held_out"],
                 report["digits_fid_held_out_train"], report["digits_classifier_accuracy"])
    metric_writer.write_scalars(step, report)
    return report
