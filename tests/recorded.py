"""Values recorded on real machines that several test modules judge: the H200 machine's driver parameters and
kernel modules (shared/facts/gpu-machine-2xH200.md), and public models' config.json values."""

from __future__ import annotations

from pathlib import Path

H200_PARAMS = """\
ResmanDebugLevel: 4294967295
RmLogonRC: 1
ModifyDeviceFiles: 1
DeviceFileUID: 0
DeviceFileGID: 0
DeviceFileMode: 438
InitializeSystemMemoryAllocations: 1
UsePageAttributeTable: 4294967295
EnableMSI: 1
EnablePCIeGen3: 0
MemoryPoolSize: 0
KMallocHeapMaxSize: 0
VMallocHeapMaxSize: 0
IgnoreMMIOCheck: 0
EnableStreamMemOPs: 0
EnableUserNUMAManagement: 1
NvLinkDisable: 0
RmProfilingAdminOnly: 1
PreserveVideoMemoryAllocations: 0
EnableS0ixPowerManagement: 0
S0ixPowerManagementVideoMemoryThreshold: 256
DynamicPowerManagement: 3
DynamicPowerManagementVideoMemoryThreshold: 200
RegisterPCIDriver: 1
EnablePCIERelaxedOrderingMode: 0
EnableResizableBar: 0
EnableGpuFirmware: 18
EnableGpuFirmwareLogs: 2
RmNvlinkBandwidthLinkCount: 0
EnableDbgBreakpoint: 0
OpenRmEnableUnsupportedGpus: 1
DmaRemapPeerMmio: 1
ImexChannelCount: 2048
CreateImexChannel0: 0
GrdmaPciTopoCheckOverride: 0
RegistryDwords: ""
RegistryDwordsPerDevice: ""
RmMsg: ""
GpuBlacklist: ""
TemporaryFilePath: ""
ExcludedGpus: ""
"""


IBGDA_PARAMS = H200_PARAMS.replace("EnableStreamMemOPs: 0", "EnableStreamMemOPs: 1").replace(
    'RegistryDwords: ""', 'RegistryDwords: "PeerMappingOverride=1;"'
)


MODULES_PEERMEM = """\
nvidia_peermem 16384 0 - Live 0xffffffffc0e3e000 (POE)
gdrdrv 24576 0 - Live 0xffffffffc0e35000 (OE)
nvidia_uvm 1437696 2 - Live 0xffffffffc1a9c000 (POE)
nvidia_drm 77824 0 - Live 0xffffffffc1a86000 (POE)
nvidia_modeset 1302528 1 nvidia_drm, Live 0xffffffffc1946000 (POE)
nvidia 56799232 52 nvidia_peermem,gdrdrv,nvidia_uvm,nvidia_modeset, Live 0xffffffffbdc00000 (POE)
mlx5_ib 483328 0 - Live 0xffffffffc18d6000 (OE)
ib_uverbs 184320 3 nvidia_peermem,rdma_ucm,mlx5_ib, Live 0xffffffffc189e000 (OE)
ib_core 471040 8 rdma_ucm,ib_ipoib,rdma_cm,iw_cm,ib_umad,mlx5_ib,ib_uverbs,ib_cm, Live 0xffffffffc1822000 (OE)
mlx5_core 2449408 1 mlx5_ib, Live 0xffffffffc1522000 (OE)
"""


MODULES_PLAIN = (
    "\n".join(
        line.replace("nvidia_peermem,", "").replace("gdrdrv,", "")
        for line in MODULES_PEERMEM.splitlines()
        if not line.startswith(("nvidia_peermem ", "gdrdrv "))
    )
    + "\n"
)


def proc_tree(root: Path, modules: str | None = MODULES_PEERMEM, params: str | None = IBGDA_PARAMS) -> Path:
    if modules is not None:
        root.mkdir(parents=True, exist_ok=True)
        (root / "modules").write_text(modules)
    if params is not None:
        (root / "driver" / "nvidia").mkdir(parents=True, exist_ok=True)
        (root / "driver" / "nvidia" / "params").write_text(params)
    return root


DEEPSEEK_V3 = {
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 61,
    "first_k_dense_replace": 3,
    "moe_layer_freq": 1,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "q_lora_rank": 1536,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "vocab_size": 129280,
    "max_position_embeddings": 163840,
    "num_nextn_predict_layers": 1,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "quantization_config": {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    },
}


QWEN3_30B_A3B = {
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "moe_intermediate_size": 768,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 48,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "vocab_size": 151936,
    "max_position_embeddings": 40960,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
