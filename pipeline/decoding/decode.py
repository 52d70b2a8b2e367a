"""Images from predicted CLIP embeddings: retrieval from the cache, or Stable unCLIP (diffusers).

Two decoders, one output format:

- **retrieval** (no generative weights; the demo's default): :func:`nearest_rows` finds, for each
  predicted embedding, the cached rows with the highest cosine similarity (the cache's row i is
  73k image i), leaving out ``exclude`` (normally the test images themselves); :func:`take_rows`
  then reads those stimuli. ``k > 1`` gives several reconstructions per test image.
- **unCLIP**: :func:`load_unclip` loads a ``StableUnCLIPImg2ImgPipeline`` (a hub id such as
  ``stabilityai/stable-diffusion-2-1-unclip-small``, which takes CLIP ViT-L/14 ``image_embeds``
  (768-d), or ``...-unclip`` for OpenCLIP ViT-H/14 (1024-d), or a local directory; fp16 on GPU)
  and :func:`unclip_decode` conditions it on predicted ``image_embeds``. With ``init_images`` the
  denoising starts from the noised latents of those images at ``strength`` (SD img2img
  semantics) instead of pure noise: this is the switch through which the detail branch acts::

      ids = nearest_rows(pred_detail, clip_store["layers/11-20_mean"], exclude=test_ids)[0][:, 0]
      init = take_rows(stimuli, ids)            # nearest cached image by predicted detail tokens
      recon = unclip_decode(pipe, pred_embeds, test_ids, init_images=init, strength=0.85)

  Each (image id, sample) pair has its own random generator seeded from (seed, id, sample), so a
  reconstruction does not depend on the batch size or on which other images are decoded. On a
  terminal a bar counts the reconstructions and a second one the denoising steps of the batch
  (:func:`decoding_bars`); nothing is printed under CI or into a log (:func:`pipeline.progress.on_terminal`).

Output on disk (:func:`write_reconstructions`): one PNG per test image named by its 0-based 73k
id zero-padded to 5 digits, ``recon/01234.png``; extra samples of the same image are
``01234_1.png``, ``01234_2.png``... :func:`write_grid` draws a quick-look PNG with ground truth
rows above reconstruction rows.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .. import hub, progress
from ..errors import UserError
from ..images import as_float_images
from ..store import take_rows  # noqa: F401  (part of this module's API)

GUIDANCE = 10.0
"""Classifier-free guidance of unCLIP decoding: ``StableUnCLIPImg2ImgPipeline``'s own default, the
value Stability's unCLIP models are run with through diffusers (7.5 is text-to-image Stable
Diffusion's default and has no unCLIP basis). One constant, so the CLI, the run driver and the
library agree."""
ID_WIDTH = 5
"""Digits of the zero-padded 0-based 73k id in file names (NSD ids run 0..72999)."""


# ---- file names and quick looks ---------------------------------------------------------------------
def recon_name(image_id: int, sample: int = 0) -> str:
    """``01234.png`` for the first reconstruction of image 1234, ``01234_<k>.png`` for sample k."""
    stem = f"{int(image_id):0{ID_WIDTH}d}"
    return f"{stem}.png" if sample == 0 else f"{stem}_{sample}.png"


def to_uint8(images: np.ndarray) -> np.ndarray:
    """uint8 images unchanged; [0, 1] float images rounded to uint8."""
    arr = np.asarray(images)
    if arr.dtype == np.uint8:
        return arr
    return np.clip(np.round(as_float_images(arr) * 255.0), 0, 255).astype(np.uint8)


def write_reconstructions(folder: Path | str, image_ids: Sequence[int], images: np.ndarray) -> list[Path]:
    """Write (n, H, W, 3) or (n, samples, H, W, 3) images as PNGs named by :func:`recon_name`."""
    arr = np.asarray(images)
    if arr.ndim == 4:
        arr = arr[:, None]
    if arr.ndim != 5 or arr.shape[-1] != 3:
        raise UserError(f"reconstructions: expected (n, [samples,] H, W, 3) images, got shape {arr.shape}")
    if len(arr) != len(image_ids):
        raise UserError(f"{len(arr)} reconstructions but {len(image_ids)} image ids")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for image_id, samples in zip(image_ids, arr):
        for k, img in enumerate(to_uint8(samples)):
            path = folder / recon_name(image_id, k)
            Image.fromarray(img).save(path)
            paths.append(path)
    return paths


def read_reconstructions(folder: Path | str, image_ids: Sequence[int], sample: int = 0) -> np.ndarray:
    """(n, H, W, 3) uint8 reconstructions ``sample`` of ``image_ids``, in that order."""
    folder = Path(folder)
    images = []
    for image_id in image_ids:
        path = folder / recon_name(image_id, sample)
        if not path.is_file():
            raise UserError(f"reconstruction of image {int(image_id)} not found: {path}")
        images.append(np.asarray(Image.open(path).convert("RGB")))
    if len({img.shape for img in images}) > 1:
        raise UserError(f"reconstructions in {folder} differ in size; decode them again")
    return np.stack(images) if images else np.empty((0, 0, 0, 3), np.uint8)


def write_grid(path: Path | str, gt: np.ndarray, rec: np.ndarray, per_row: int = 10, tile: int = 96) -> Path:
    """A PNG with ``per_row`` images per row pair: ground truth above, reconstruction below."""
    gt, rec = to_uint8(gt), to_uint8(rec)
    if len(gt) != len(rec) or len(gt) == 0:
        raise UserError(f"grid: need as many reconstructions as ground-truth images ({len(gt)} vs {len(rec)})")
    gap = max(tile // 16, 1)
    cols = min(per_row, len(gt))
    pairs = -(-len(gt) // cols)
    canvas = Image.new("RGB", (cols * (tile + gap) + gap, pairs * (2 * tile + 3 * gap) + gap), "white")
    for i in range(len(gt)):
        x = gap + (i % cols) * (tile + gap)
        y = gap + (i // cols) * (2 * tile + 3 * gap)
        canvas.paste(Image.fromarray(gt[i]).resize((tile, tile), Image.BILINEAR), (x, y))
        canvas.paste(Image.fromarray(rec[i]).resize((tile, tile), Image.BILINEAR), (x, y + tile + gap))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="PNG")
    return path


# ---- retrieval ----------------------------------------------------------------------------------------
def _unit(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def nearest_rows(
    queries: np.ndarray, bank, *, exclude: Sequence[int] | None = None, k: int = 1, max_values: int = 1 << 26
) -> tuple[np.ndarray, np.ndarray]:
    """Row numbers (n, k) of the ``k`` bank rows most cosine-similar to each query, best first, and
    their similarities (n, k).

    ``queries`` (n, ...) and ``bank`` (N, ...) are flattened per row; ``bank`` may be a lazy zarr or
    h5py array and is read in row blocks of at most ``max_values`` values. Rows in ``exclude`` are
    never returned. Equal similarities go to the lower row number.
    """
    q = np.asarray(queries)
    n = len(q)
    q = _unit(q.reshape(n, -1))
    per_row = int(np.prod(bank.shape[1:], dtype=np.int64))
    if per_row != q.shape[1]:
        raise UserError(
            f"predictions have {q.shape[1]} values per image but the cached array has {per_row} "
            f"(shape {tuple(bank.shape)}); decode with the layer the adapter was fitted on"
        )
    n_bank = bank.shape[0]
    skip = np.zeros(n_bank, bool)
    if exclude is not None and len(exclude):
        ex = np.asarray(exclude, dtype=np.int64)
        if ex.min() < 0 or ex.max() >= n_bank:
            raise UserError(f"excluded image ids must be in 0..{n_bank - 1} (the cached images), got {ex.min()}..{ex.max()}")
        skip[ex] = True
    if k < 1 or k > n_bank - skip.sum():
        raise UserError(f"cannot retrieve {k} images from {n_bank - skip.sum()} candidates")
    best_sim = np.full((n, 0), -np.inf, np.float32)
    best_idx = np.zeros((n, 0), np.int64)
    step = max(1, max_values // max(per_row, 1))
    for start in range(0, n_bank, step):
        rows = _unit(np.asarray(bank[start : start + step]).reshape(-1, per_row))
        sim = q @ rows.T
        sim[:, skip[start : start + len(rows)]] = -np.inf
        sims = np.concatenate([best_sim, sim], axis=1)
        idx = np.concatenate([best_idx, np.broadcast_to(np.arange(start, start + len(rows)), sim.shape)], axis=1)
        best_sim, best_idx = _top_k(sims, idx, k)
    return best_idx, best_sim


def _top_k(sims: np.ndarray, idx: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest similarities per row, best first, equal ones by lower id; partitions before sorting."""
    if sims.shape[1] > k:
        kth = np.partition(sims, -k, axis=1)[:, -k]
        picked = [np.flatnonzero(row >= t) for row, t in zip(sims, kth)]  # k or more (ties) per row
    else:
        picked = [np.arange(sims.shape[1])] * len(sims)
    out_sim = np.empty((len(sims), k), sims.dtype)
    out_idx = np.empty((len(sims), k), np.int64)
    for r, cols in enumerate(picked):
        order = cols[np.lexsort((idx[r, cols], -sims[r, cols]))][:k]
        out_sim[r], out_idx[r] = sims[r, order], idx[r, order]
    return out_sim, out_idx


def retrieval_decode(
    pred: np.ndarray, bank, images, *, exclude: Sequence[int] | None = None, k: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Reconstructions (n, k, H, W, 3) = the stimuli of the ``k`` nearest cached rows, and their ids (n, k)."""
    ids, _ = nearest_rows(pred, bank, exclude=exclude, k=k)
    if images.shape[0] != bank.shape[0]:
        raise UserError(f"the cache has {bank.shape[0]} rows but the stimulus file {images.shape[0]} images")
    found = take_rows(images, ids.reshape(-1))
    return found.reshape(*ids.shape, *found.shape[1:]), ids


# ---- unCLIP -------------------------------------------------------------------------------------------
def load_unclip(
    model: str | Path,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    local_files_only: bool = False,
    cache_dir: Path | str | None = None,
):
    """A ``StableUnCLIPImg2ImgPipeline`` from a hub id or a local directory, without its CLIP image
    encoder (the embeddings are predicted). fp16 on CUDA, fp32 elsewhere unless ``dtype`` is given.

    Nothing is downloaded when ``local_files_only`` or ``HF_HUB_OFFLINE=1``; missing weights raise
    a one-line :class:`UserError`.
    """
    cls = hub.diffusers_module().StableUnCLIPImg2ImgPipeline
    name, local = hub.locate(model, "unCLIP model")
    opts = hub.options(local_files_only, cache_dir)
    config = hub.read_config(cls, name, local, "unCLIP model", opts)
    if config.get("_class_name") != cls.__name__:
        raise UserError(f"unCLIP model {name!r} is a {config.get('_class_name')}, not a {cls.__name__}")
    skip = {k: None for k, v in config.items() if isinstance(v, list) and v and v[0] is None}
    skip.update(feature_extractor=None, image_encoder=None)
    pipe = hub.load(cls, name, "unCLIP model", opts, dtype=hub.default_dtype(device, dtype), low_cpu_mem_usage=False,
                    **skip)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextmanager
def decoding_bars(pipe, enabled: bool | None, total: int, desc: str, unit: str) -> Iterator:
    """A bar over ``total`` images or clips, with the pipeline's own per-step bar (diffusers'
    ``progress_bar``) below it for the duration; both on a terminal only when ``enabled`` is None.
    The pipeline's bar settings are restored afterwards."""
    enabled = progress.on_terminal() if enabled is None else enabled
    saved = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.set_progress_bar_config(disable=not enabled, leave=False, desc="denoising steps", dynamic_ncols=True)
    try:
        with progress.bar(enabled, total=total, desc=desc, unit=unit) as outer:
            yield outer
    finally:
        pipe.set_progress_bar_config(**saved)


def embed_dim(pipe) -> int:
    """The CLIP image-embedding size the pipeline's UNet was trained on (768 for -small, 1024 for -h)."""
    return int(pipe.image_normalizer.mean.shape[-1])


def sample_generator(seed: int, image_id: int, sample: int) -> torch.Generator:
    """The CPU generator of one reconstruction, independent of batching."""
    state = np.random.SeedSequence([int(seed), int(image_id), int(sample)]).generate_state(1, np.uint64)[0]
    return torch.Generator("cpu").manual_seed(int(state))


@torch.no_grad()
def prompt_embeddings(pipe, prompt: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """(1, L, C) prompt and negative-prompt embeddings from the pipeline's own text encoder."""
    if pipe.tokenizer is None or pipe.text_encoder is None:
        raise UserError("this unCLIP pipeline has no tokenizer/text encoder: pass prompt_embeds")
    pos, neg = pipe.encode_prompt(prompt, pipe._execution_device, 1, True, negative_prompt=None)
    return pos, neg


@torch.no_grad()
def denoise(
    pipe,
    image_embeds: torch.Tensor,
    prompt_embeds: torch.Tensor,
    negative_prompt_embeds: torch.Tensor,
    generators: list[torch.Generator],
    *,
    steps: int = 20,
    guidance: float = GUIDANCE,
    noise_level: int = 0,
    init_images: torch.Tensor | None = None,
    strength: float = 1.0,
    height: int | None = None,
    width: int | None = None,
) -> np.ndarray:
    """One batch through the unCLIP UNet: the pipeline's own ``__call__`` steps with
    ``image_embeds`` given, plus an optional img2img start from ``init_images`` ((B, 3, H, W) in
    [-1, 1]). Without ``init_images`` it reproduces ``pipe(image_embeds=..., prompt_embeds=...)``
    for the same generators. Returns (B, H, W, 3) float images in [0, 1]."""
    from diffusers.utils.torch_utils import randn_tensor

    device, dtype = pipe._execution_device, pipe.unet.dtype
    b = len(image_embeds)
    height = height or pipe.unet.config.sample_size * pipe.vae_scale_factor
    width = width or pipe.unet.config.sample_size * pipe.vae_scale_factor
    cfg = guidance > 1.0
    text = prompt_embeds.to(device, dtype)
    cond = pipe.noise_image_embeddings(
        image_embeds.to(device, dtype), noise_level=torch.tensor([noise_level], device=device), generator=generators
    )
    if cfg:
        cond = torch.cat([torch.zeros_like(cond), cond])
        text = torch.cat([negative_prompt_embeds.to(device, dtype), text])
    pipe.scheduler.set_timesteps(steps, device=device)
    timesteps = pipe.scheduler.timesteps
    shape = (b, pipe.unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    noise = randn_tensor(shape, generator=generators, device=device, dtype=text.dtype)
    if init_images is None:
        latents = noise * pipe.scheduler.init_noise_sigma
    else:  # StableDiffusionImg2ImgPipeline.get_timesteps / prepare_latents
        t_start = steps - min(int(steps * strength), steps)
        timesteps = timesteps[t_start * pipe.scheduler.order :]
        if hasattr(pipe.scheduler, "set_begin_index"):
            pipe.scheduler.set_begin_index(t_start * pipe.scheduler.order)
        init = pipe.vae.encode(init_images.to(device, dtype)).latent_dist.mean * pipe.vae.config.scaling_factor
        latents = pipe.scheduler.add_noise(init, noise, timesteps[:1].repeat(b))
    extra = pipe.prepare_extra_step_kwargs(generators, 0.0)
    for t in pipe.progress_bar(timesteps):  # shown as its set_progress_bar_config says
        x = torch.cat([latents] * 2) if cfg else latents
        x = pipe.scheduler.scale_model_input(x, t)
        eps = pipe.unet(x, t, encoder_hidden_states=text, class_labels=cond, return_dict=False)[0]
        if cfg:
            uncond, cond_eps = eps.chunk(2)
            eps = uncond + guidance * (cond_eps - uncond)
        latents = pipe.scheduler.step(eps, t, latents, **extra, return_dict=False)[0]
    image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type="np")


def unclip_decode(
    pipe,
    image_embeds: np.ndarray,
    image_ids: Sequence[int],
    *,
    samples: int = 1,
    steps: int = 20,
    guidance: float = GUIDANCE,
    noise_level: int = 0,
    seed: int = 0,
    batch_size: int = 4,
    init_images: np.ndarray | None = None,
    strength: float = 0.85,
    prompt: str = "",
    prompt_embeds: torch.Tensor | None = None,
    negative_prompt_embeds: torch.Tensor | None = None,
    height: int | None = None,
    width: int | None = None,
    show_progress: bool | None = None,
) -> np.ndarray:
    """Reconstructions (n, samples, H, W, 3) uint8 of predicted ``image_embeds`` (n, D).

    ``init_images`` (n, h, w, 3) switches the img2img start on (see the module docstring), each
    preprocessed with its batch;
    ``strength`` is the fraction of the ``steps`` that is run from it (1.0 = almost pure noise).
    ``prompt_embeds`` (1, L, C) replaces the text encoder (needed when the pipeline has none);
    the negative defaults to the same embedding, as an empty prompt gives. ``show_progress``: the
    bars of :func:`decoding_bars` (default: on a terminal only).
    """
    emb = np.asarray(image_embeds, dtype=np.float32)
    n = len(image_ids)
    if emb.ndim != 2 or len(emb) != n:
        raise UserError(f"unCLIP: expected ({n}, D) image_embeds for {n} image ids, got shape {emb.shape}")
    if emb.shape[1] != embed_dim(pipe):
        raise UserError(
            f"unCLIP: predicted image_embeds are {emb.shape[1]}-d but this unCLIP model takes "
            f"{embed_dim(pipe)}-d CLIP embeddings (-unclip-small: ViT-L/14, 768; -unclip: ViT-H/14, 1024)"
        )
    n_noise = pipe.image_noising_scheduler.config.num_train_timesteps
    if not 0 <= noise_level < n_noise:
        raise UserError(f"unCLIP noise_level must be in 0..{n_noise - 1}, not {noise_level}")
    if steps < 1 or samples < 1 or batch_size < 1:
        raise UserError("unCLIP steps, samples and batch_size must be >= 1")
    if init_images is not None:
        if len(init_images) != n:
            raise UserError(f"unCLIP: {len(init_images)} init images for {n} image ids")
        if not 0.0 < strength <= 1.0 or int(steps * strength) < 1:
            raise UserError(f"unCLIP strength must be in (0, 1] with steps x strength >= 1, not {strength} x {steps}")
    if prompt_embeds is None:
        prompt_embeds, default_neg = prompt_embeddings(pipe, prompt)
        negative_prompt_embeds = default_neg if negative_prompt_embeds is None else negative_prompt_embeds
    if negative_prompt_embeds is None:
        negative_prompt_embeds = prompt_embeds

    jobs = [(i, k) for i in range(n) for k in range(samples)]
    out: list[np.ndarray] = []
    with decoding_bars(pipe, show_progress, len(jobs), "unclip", "img") as bar:
        for start in range(0, len(jobs), batch_size):
            batch = jobs[start : start + batch_size]
            rows = [i for i, _ in batch]
            images = denoise(
                pipe,
                torch.from_numpy(emb[rows]),
                prompt_embeds.expand(len(batch), -1, -1),
                negative_prompt_embeds.expand(len(batch), -1, -1),
                [sample_generator(seed, image_ids[i], k) for i, k in batch],
                steps=steps, guidance=guidance, noise_level=noise_level,
                init_images=None if init_images is None else _init_tensor(pipe, to_uint8(init_images[rows]), height, width),
                strength=strength, height=height, width=width,
            )
            out.append(to_uint8(images))
            bar.update(len(batch))
    result = np.concatenate(out)
    return result.reshape(n, samples, *result.shape[1:])


def _init_tensor(pipe, images: np.ndarray, height: int | None, width: int | None) -> torch.Tensor:
    """(n, h, w, 3) uint8 -> (n, 3, H, W) in [-1, 1] at the output size, via the pipeline's processor.
    Called per decode batch: the float32 tensors of 1,000 init images at 768 px are ~7 GB."""
    height = height or pipe.unet.config.sample_size * pipe.vae_scale_factor
    width = width or pipe.unet.config.sample_size * pipe.vae_scale_factor
    return pipe.image_processor.preprocess([Image.fromarray(img) for img in images], height=height, width=width)
