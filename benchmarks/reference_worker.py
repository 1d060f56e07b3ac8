"""PyTorch side of `reference_compare.py`: times the published DiffuSETS modules, one run per request.

Runs under a separate Python environment that has PyTorch (not a project dependency) and imports the
published modules from a user's checkout of the published repository (`--reference-repo`); it imports
nothing from the `diffusets_jax` package and no JAX (only `arguments.py` beside it, which needs nothing but the
standard library). Requests arrive as JSON lines on stdin, answers go to stdout:

    {"cmd": "setup", "measure": "vae_train", "batch": 16}  ->  {"ok": true, "setup_s": ...}
    {"cmd": "run", "measure": "vae_train", "batch": 16}    ->  {"seconds": ...}
    {"cmd": "quit"}

Measures (the same names as ours): `matmul` (an N x N float32 product, N given as the batch), `unet_forward`,
`unet_train`, `vae_train`, `vae_decode`. The train steps
are forward, the published loss, backward and an AdamW step, as the published training code does them.
"""

from __future__ import annotations

import json
import sys
import time

import arguments


def build(measure: str, batch: int, torch, modules):
    """A no-argument callable that runs `measure` once at `batch` (inputs and optimiser built here)."""
    vae_model, unet_module = modules
    torch.manual_seed(0)
    if measure == "matmul":
        a = torch.randn(batch, batch)

        def run():
            torch.mm(a, a)

        return run
    if measure in ("unet_forward", "unet_train"):
        # The published configuration (DiffuSETS_inference.py builds the same network for its checkpoint).
        unet = unet_module.ECGconditional(1000, kernel_size=7, num_levels=7, n_channels=4, text_embed_dim=1536)
        x = torch.randn(batch, 4, 128)
        t = torch.randint(1, 999, (batch,))
        text = torch.nn.functional.normalize(torch.randn(batch, 1, 1536), dim=-1)
        condition = {"gender": torch.randint(0, 2, (batch, 1, 1)).float(),
                     "age": torch.rand(batch, 1, 1) * 70 + 20, "heart rate": torch.rand(batch, 1, 1) * 60 + 50}
        if measure == "unet_forward":
            unet.eval()

            def run():
                with torch.no_grad():
                    unet(x, t, text, condition)

            return run
        unet.train()
        optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
        noise = torch.randn_like(x)

        def run():
            estimate = unet(x, t, text, condition)
            loss = torch.nn.functional.mse_loss(estimate, noise, reduction="sum").div(batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()

        return run
    if measure == "vae_decode":
        decoder = vae_model.VAE_Decoder().eval()
        z = torch.randn(batch, 4, 128)

        def run():
            with torch.no_grad():
                decoder(z.clone())  # the decoder divides its input in place

        return run
    if measure == "vae_train":
        encoder, decoder = vae_model.VAE_Encoder().train(), vae_model.VAE_Decoder().train()
        optimizer = torch.optim.AdamW(list(encoder.parameters()) + list(decoder.parameters()), lr=1e-4)
        ecg = torch.randn(batch, 1024, 12) * 0.2

        def run():
            z, mean, logvar = encoder(ecg)
            recon = decoder(z)
            loss = vae_model.loss_function(recon, ecg, mean, logvar, kld_weight=1.0)["loss"]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()

        return run
    raise ValueError(f"unknown measure {measure!r}")


def main() -> None:
    parser = arguments.parser(__doc__.splitlines()[0])
    parser.add_argument("--reference-repo", required=True, help="checkout of the published DiffuSETS code")
    parser.add_argument("--threads", type=arguments.count, required=True, help="torch.set_num_threads")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="glibc keeps freed memory mapped, as our side's (diffusets_jax/host_memory.py)")
    args = parser.parse_args()
    if args.keep_freed_memory:
        # The same two glibc settings our side makes, so both sides run on the same allocator: no mmap for large
        # blocks (M_MMAP_MAX = 0), no trimming of the heap's top (M_TRIM_THRESHOLD = -1).
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        if not (libc.mallopt(-4, 0) and libc.mallopt(-1, -1)):
            raise SystemExit("mallopt refused the settings")
    sys.path.insert(0, args.reference_repo)
    import torch
    from unet import unet_conditional
    from vae import vae_model

    torch.set_num_threads(args.threads)
    modules = (vae_model, unet_conditional)
    runs = {}
    reply = {"ready": True, "torch": torch.__version__, "threads": torch.get_num_threads(),
             "keep_freed_memory": args.keep_freed_memory}
    print(json.dumps(reply), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        key = (request.get("measure"), request.get("batch"))
        if request["cmd"] == "quit":
            break
        if request["cmd"] == "setup":
            start = time.perf_counter()
            runs[key] = build(*key, torch, modules)
            runs[key]()  # warm-up: allocator, oneDNN primitive caches
            reply = {"ok": True, "setup_s": time.perf_counter() - start}
        else:
            start = time.perf_counter()
            runs[key]()
            reply = {"seconds": time.perf_counter() - start}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
