"""maskfill engine: native diffusion code models, fill-in-the-middle by denoising."""
