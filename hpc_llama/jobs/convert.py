"""Convert a checkpoint between formats, streaming one tensor at a time.

    hpc-llama convert /models/Llama-3-8B llama3-8b.h5                 # HF directory -> one HDF5 file
    hpc-llama convert /models/Llama-3-8B llama3-8b --shard-size 2GB   # -> directory of HDF5 shards
    hpc-llama convert llama3-8b.h5 llama3-8b-hf --format hf           # -> HF directory (from_pretrained loads it)
    hpc-llama convert model.Q4_1.gguf model.h5                        # llama.cpp GGUF -> HDF5 (dequantized)
    hpc-llama convert smollm2-135m smollm2.h5                         # the embedded default model
    hpc-llama convert small-int4.h5 small-hf --format hf --dequantize # compressed -> dense HF directory

The destination format follows from its name unless --format says: a name
ending in .h5 is one HDF5 file; otherwise an HF or GGUF source becomes HDF5
shards and an HDF5 source becomes an HF directory. GGUF's quantized tensors
become float32, its Q/K rows are put back in HF's order, and its tokenizer and
chat template become tokenizer.json and tokenizer_config.json. Tensors are copied bit for bit unless
--dtype asks for a cast. A compressed checkpoint (hpc-llama compress) keeps its
packed tensors in HDF5; HF has no form for them, so writing HF needs
--dequantize, which also multiplies low-rank factors back. The output appears
only when complete.
"""

from __future__ import annotations

FORMATS = ("h5", "h5-sharded", "hf")


def add_arguments(p):
    from ..cli import add_overwrite_argument, add_quiet_argument

    p.add_argument("src", help="HF model directory, .h5 file, sharded HDF5 directory, GGUF file, or smollm2-135m")
    p.add_argument("dst", help="destination file (.h5) or directory")
    p.add_argument("--format", choices=FORMATS, help="destination format (default: from the destination name)")
    p.add_argument("--shard-size", default=None, metavar="SIZE",
                   help="largest shard, e.g. 2GB (default 5GB for directories); shards are cut at layer boundaries")
    p.add_argument("--dtype", choices=("keep", "fp32", "bf16", "fp16"), default="keep",
                   help="cast floating-point tensors (default: keep the stored dtype, bit-exact)")
    p.add_argument("--dequantize", action="store_true", help="write a compressed checkpoint's dense weights "
                   "(quantized tensors dequantized, low-rank factors multiplied back)")
    add_overwrite_argument(p, "the destination")
    add_quiet_argument(p)


def destination_format(dst: str, src_format: str, requested: str | None, shard_size: str | None) -> str:
    if requested:
        return requested
    if dst.endswith((".h5", ".hdf5")):
        return "h5"
    if src_format in ("hf", "gguf") or shard_size is not None:
        return "h5-sharded"
    return "hf"


def run(args) -> int:
    from ..atomic import claim_output
    from ..embedded import resolve
    from ..parallel.ranks import world_comm

    comm = world_comm()
    if comm.Get_rank() != 0:
        comm.Barrier()  # conversion is serial: the other ranks only wait for it
        return 0
    with claim_output(args.dst, [resolve(args.src)], args.overwrite):
        _convert(args)
    if comm.Get_size() > 1:
        comm.Barrier()
    return 0


def _convert(args) -> None:
    import torch

    from ..atomic import atomic_path
    from ..checkpoint import open_checkpoint
    from ..checkpoint.h5 import write_checkpoint
    from ..checkpoint.hf import write_hf
    from ..checkpoint.slices import check_structure
    from ..checkpoint.views import CastReader, DenseReader, uniform_hf
    from ..config import parse_size
    from ..errors import HpcLlamaError
    from ..model.quantized import SCHEMES
    from ..progress import report

    reader = open_checkpoint(args.src)
    try:
        check_structure(reader)
        fmt = destination_format(args.dst, reader.format, args.format, args.shard_size)
        if fmt == "h5" and args.shard_size:
            raise HpcLlamaError("--shard-size needs a sharded destination (--format h5-sharded or hf)")
        shard = parse_size(args.shard_size or "5GB")
        if args.dequantize:
            reader = DenseReader(reader)
        packed = next((n for n in reader.names() if reader.info(n).scheme in SCHEMES), None)
        if packed is not None and (fmt == "hf" or args.dtype != "keep"):
            what = "an HF directory" if fmt == "hf" else f"a {args.dtype} cast"
            raise HpcLlamaError(f"{args.src}: {packed} is stored as {reader.info(packed).scheme}, which {what} "
                                f"cannot hold; give --dequantize to write dense weights")
        if args.dtype != "keep":
            reader = CastReader(reader, {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype])
        with atomic_path(args.dst, args.overwrite) as tmp:
            if fmt == "hf":
                write_hf(tmp, reader, shard, uniform_hf(reader) if "hpc_llama" in reader.hf_config else None)
            else:
                write_checkpoint(tmp, reader, shard if fmt == "h5-sharded" else None)
        n = len(reader.names())
        report(f"wrote {args.dst} ({fmt}, {n} tensors, {reader.config.n_params / 1e6:.1f}M parameters)", args.quiet)
    finally:
        reader.close()
