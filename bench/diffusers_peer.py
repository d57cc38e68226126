"""The peer a user would pick instead: the training loop of diffusers' unconditional example
(examples/unconditional_image_generation/train_unconditional.py), written out here as it runs.

Kept from the example: a folder of images read with PIL through its torchvision transforms
(Resize, CenterCrop, RandomHorizontalFlip, ToTensor, Normalize) in a torch DataLoader
(`--dataloader_num_workers`, default 0), `UNet2DModel`, `DDPMScheduler.add_noise`, the MSE on
eps in float32, Accelerate's `prepare` and autocast (`--mixed_precision`), `clip_grad_norm_`
at 1.0, AdamW (lr 1e-4, betas 0.95/0.999, weight decay 1e-6, eps 1e-8), a cosine schedule with
warm-up, diffusers' `EMAModel` with warm-up, and the loss read with `.item()` every step for the
progress bar. The network is our preset's, converted (pipeline/convert.py): the comparison is of
the training loop around the same U-Net.
"""

from __future__ import annotations

from pathlib import Path

import torch
from gpu_trainer import timed


class ImageFolder(torch.utils.data.Dataset):
    """The example's data set: image files opened with PIL, converted to RGB, transformed."""

    def __init__(self, folder: Path, transform):
        self.files, self.transform = sorted(Path(folder).glob("*.png")) + sorted(Path(folder).glob("*.jpg")), transform

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image

        with Image.open(self.files[i]) as im:
            return {"input": self.transform(im.convert("RGB"))}


def example_loop_row(images: Path, unet_cfg: dict, batch: int, *, steps: int, warmup: int, workers: int,
                     device: torch.device) -> dict:
    """img/s (median step), step spread and peak memory of the example's loop."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from diffusers import DDPMScheduler, UNet2DModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from torchvision import transforms

    from pipeline.convert import diffusers_config

    cuda = device.type == "cuda"
    acc = Accelerator(mixed_precision="bf16" if cuda else "no", gradient_accumulation_steps=1, cpu=not cuda)
    res = unet_cfg["resolution"]
    model = UNet2DModel(**diffusers_config(unet_cfg))
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
    augment = transforms.Compose([
        transforms.Resize(res, interpolation=transforms.InterpolationMode.BILINEAR), transforms.CenterCrop(res),
        transforms.RandomHorizontalFlip(), transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])
    loader = torch.utils.data.DataLoader(ImageFolder(images, augment), batch_size=batch, shuffle=True,
                                         num_workers=workers, drop_last=True, persistent_workers=workers > 0)
    lr_scheduler = get_scheduler("cosine", optimizer=optimizer, num_warmup_steps=500, num_training_steps=100000)
    model, optimizer, loader, lr_scheduler = acc.prepare(model, optimizer, loader, lr_scheduler)
    ema = EMAModel(model.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4,
                   model_cls=UNet2DModel, model_config=acc.unwrap_model(model).config)
    ema.to(acc.device)
    weight_dtype = torch.bfloat16 if acc.mixed_precision == "bf16" else torch.float32

    def batches():
        while True:
            yield from loader

    it = batches()

    def step():
        clean = next(it)["input"].to(weight_dtype)
        noise = torch.randn(clean.shape, dtype=weight_dtype, device=clean.device)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (clean.shape[0],), device=clean.device).long()
        noisy = noise_scheduler.add_noise(clean, noise, t)
        with acc.accumulate(model):
            out = model(noisy, t).sample
            loss = torch.nn.functional.mse_loss(out.float(), noise.float())
            acc.backward(loss)
            if acc.sync_gradients:
                acc.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
        if acc.sync_gradients:
            ema.step(model.parameters())
        return {"loss": loss.detach().item(), "lr": lr_scheduler.get_last_lr()[0], "ema_decay": ema.cur_decay_value}

    try:
        return {**timed(step, batch, device, steps, warmup), "workers": workers}
    finally:

        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        if cuda:
            torch.cuda.empty_cache()
