"""QLoRA's two library pieces, written out in plain PyTorch to be read, and proven equal to the library.

minivlm/lora.py is the LoRA math itself. The other two pieces of QLoRA are calls into bitsandbytes:

    nf4.py        NF4 with double quantization: what `Params4bit` does to a frozen weight (quant.py)
    adam8bit.py   one step of block-wise 8-bit AdamW: what `bnb.optim.AdamW8bit` does (optim.py)

Training keeps using bitsandbytes' kernels; these files are for reading. tests/test_reference.py
checks them against bitsandbytes on this machine's CPU, bit for bit, and docs/qlora.md says where
bitsandbytes' CUDA kernels round differently.
"""
