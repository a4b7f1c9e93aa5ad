//! Cache layout: `layers` × {K, V?} regions of `block_number × block_bytes` bytes each,
//! plus, with fp8 scale caches, {K-scale, V-scale?} regions of `block_number ×
//! scale_block_bytes` bytes. Block `b` of a region starts at `base + b × (its block bytes)`.
//! Per layer the regions are K, V, K-scale, V-scale (those present, in that order).

use crate::error::{Error, Result};
use std::sync::Arc;

/// Upper bound on layers, so that descriptors and region tables stay small and bounded.
pub const MAX_LAYERS: u32 = 4096;

/// Key or value half of a layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheKind {
    Key = 0,
    Value = 1,
}

/// The shape of one side's cache: how many layers, which regions per layer, and the
/// block count and size of each region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheLayout {
    /// Layers (1..=`MAX_LAYERS`); each has a key region, and the optional ones below.
    pub layers: u32,
    /// Whether each layer has a value region (false: key-only caches).
    pub has_value: bool,
    /// Blocks per region (valid block ids are `0..block_number`).
    pub block_number: u32,
    /// Bytes of one block of a key or value region.
    pub block_bytes: u64,
    /// Bytes of one block of a scale region; 0: no scale caches.
    pub scale_block_bytes: u64,
}

impl CacheLayout {
    /// A layout without scale regions; refuses 0 or more than `MAX_LAYERS` layers, a zero
    /// block count or size, and regions larger than `isize::MAX` bytes.
    pub fn new(layers: u32, has_value: bool, block_number: u32, block_bytes: u64) -> Result<Self> {
        if layers == 0 || layers > MAX_LAYERS {
            return Err(Error::invalid(
                "localKeyCache",
                format!("{layers} layers given; between 1 and {MAX_LAYERS} regions are required"),
            ));
        }
        if block_number == 0 {
            return Err(Error::invalid(
                "blockNumber",
                "0 given; it must be at least 1",
            ));
        }
        if block_bytes == 0 {
            return Err(Error::invalid(
                "blockBytes",
                "0 given; it must be at least 1",
            ));
        }
        let layout = CacheLayout {
            layers,
            has_value,
            block_number,
            block_bytes,
            scale_block_bytes: 0,
        };
        layout.region_bytes_checked()?;
        Ok(layout)
    }

    /// This layout with scale regions of `scale_block_bytes` per block (0: none).
    pub fn with_scales(mut self, scale_block_bytes: u64) -> Result<Self> {
        self.scale_block_bytes = scale_block_bytes;
        if u64::from(self.block_number)
            .checked_mul(scale_block_bytes)
            .is_none_or(|bytes| bytes > isize::MAX as u64)
        {
            return Err(Error::RegionOverflow {
                what: format!(
                    "blockNumber {} × scaleBlockBytes {scale_block_bytes} exceeds the largest region size {}",
                    self.block_number,
                    isize::MAX
                ),
            });
        }
        Ok(self)
    }

    /// Whether each layer has fp8 scale regions (`scale_block_bytes > 0`).
    pub fn has_scales(&self) -> bool {
        self.scale_block_bytes > 0
    }

    /// K/V kinds per layer (1 or 2), without the scales.
    #[inline]
    pub fn cache_kinds(&self) -> u32 {
        if self.has_value {
            2
        } else {
            1
        }
    }

    /// Bytes of one block of kind `kind` (K, V, then the scales).
    #[inline]
    pub fn kind_block_bytes(&self, kind: u32) -> u64 {
        if kind < self.cache_kinds() {
            self.block_bytes
        } else {
            self.scale_block_bytes
        }
    }

    /// What kind `kind` of a layer is called in the API.
    pub fn kind_name(&self, kind: u32) -> &'static str {
        let cache = self.cache_kinds();
        match (kind >= cache, kind % cache) {
            (false, 0) => "localKeyCache",
            (false, _) => "localValueCache",
            (true, 0) => "keyScaleCache",
            (true, _) => "valueScaleCache",
        }
    }

    fn region_bytes_checked(&self) -> Result<u64> {
        let limit = isize::MAX as u64;
        match u64::from(self.block_number).checked_mul(self.block_bytes) {
            Some(bytes) if bytes <= limit => Ok(bytes),
            _ => Err(Error::RegionOverflow {
                what: format!(
                    "blockNumber {} × blockBytes {} exceeds the largest region size {limit}",
                    self.block_number, self.block_bytes
                ),
            }),
        }
    }

    /// Bytes per region (checked at construction).
    pub fn region_bytes(&self) -> u64 {
        u64::from(self.block_number) * self.block_bytes
    }

    /// Regions per layer: K, V when present, and their scales when present.
    #[inline]
    pub fn kinds(&self) -> u32 {
        self.cache_kinds() * if self.has_scales() { 2 } else { 1 }
    }

    /// Regions in the whole cache: layers × [`kinds`](Self::kinds).
    pub fn region_count(&self) -> u32 {
        self.layers * self.kinds()
    }

    /// Index of a region in the flat region table (layer-major, K before V).
    pub fn region_index(&self, layer: u32, kind: CacheKind) -> u32 {
        layer * self.kinds() + kind as u32
    }

    /// Checks a layer index given by a caller (any number) against this layout.
    pub fn check_layer(&self, layer: f64) -> Result<u32> {
        if layer.fract() == 0.0 && layer >= 0.0 && layer < f64::from(self.layers) {
            Ok(layer as u32)
        } else {
            Err(Error::LayerOutOfRange {
                layer,
                layers: self.layers,
            })
        }
    }
}

/// One registered region: where it starts and how long it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    pub addr: u64,
    pub len: u64,
}

/// Where a region's bytes live (see `cuda::detect_region_memory`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MemoryKind {
    /// Memory the CPU can read and write (pageable, pinned or managed).
    #[default]
    Host,
    /// GPU memory of CUDA device `ordinal`.
    Device {
        /// The CUDA device ordinal.
        ordinal: u32,
    },
}

impl MemoryKind {
    /// Whether the region is GPU memory.
    pub fn is_device(self) -> bool {
        matches!(self, MemoryKind::Device { .. })
    }
}

/// The regions of one communicator, in `CacheLayout::region_index` order.
#[derive(Debug, Clone)]
pub struct RegionTable {
    /// The layout every region follows.
    pub layout: CacheLayout,
    regions: Vec<Region>,
    /// Per region; all `Host` until `set_memory`.
    memory: Vec<MemoryKind>,
    /// The CUDA device (gpuIdx) whose context moves device regions, when any region is one.
    gpu: Option<u32>,
    /// Imported memory the regions lie in: dropped with the table, after every transport
    /// thread that holds the table is gone.
    imports: Arc<[crate::import::ImportedMemory]>,
}

impl RegionTable {
    /// The CUDA IPC handle another process shared for the allocation mapped at `base`, when
    /// a region was imported from one (such memory cannot be exported again).
    pub(crate) fn imported_ipc_handle(
        &self,
        base: u64,
    ) -> Option<[u8; kvtransfer_cuda::IPC_HANDLE_BYTES]> {
        self.imports.iter().find_map(|i| i.ipc_handle_at(base))
    }

    /// The cuMem segment holding address `at`, when a region was imported from another
    /// process's descriptors (such memory cannot be exported again): its base, its size,
    /// and a duplicate of the shared descriptor.
    pub(crate) fn imported_segment_at(
        &self,
        at: u64,
    ) -> Option<(u64, u64, std::io::Result<std::os::fd::OwnedFd>)> {
        self.imports.iter().find_map(|i| i.segment_at(at))
    }

    /// The imported memory the regions lie in, in the order it was imported.
    pub(crate) fn imports(&self) -> &[crate::import::ImportedMemory] {
        &self.imports
    }

    /// Keeps `imports` mapped as long as this table lives.
    pub(crate) fn hold(&mut self, imports: Vec<crate::import::ImportedMemory>) {
        self.imports = imports.into();
    }

    /// `keys[l]`, `values[l]` are base addresses; `values` is empty for key-only caches.
    pub fn new(keys: &[u64], values: &[u64], block_number: u32, block_bytes: u64) -> Result<Self> {
        Self::with_scales(keys, values, &[], &[], block_number, block_bytes, 0)
    }

    /// [`RegionTable::new`] with fp8 scale regions: `key_scales[l]` (and `value_scales[l]`
    /// when values are present) of `block_number × scale_block_bytes` bytes each; all
    /// empty with `scale_block_bytes` 0.
    pub fn with_scales(
        keys: &[u64],
        values: &[u64],
        key_scales: &[u64],
        value_scales: &[u64],
        block_number: u32,
        block_bytes: u64,
        scale_block_bytes: u64,
    ) -> Result<Self> {
        if !values.is_empty() && values.len() != keys.len() {
            return Err(Error::invalid(
                "localValueCache",
                format!(
                    "{} regions given but localKeyCache has {}; pass one per layer or [] for key-only caches",
                    values.len(),
                    keys.len()
                ),
            ));
        }
        let layers = u32::try_from(keys.len()).unwrap_or(u32::MAX);
        let layout = CacheLayout::new(layers, !values.is_empty(), block_number, block_bytes)?
            .with_scales(scale_block_bytes)?;
        check_scales(keys, values, key_scales, value_scales, scale_block_bytes)?;
        let len = layout.region_bytes();
        let scale_len = u64::from(block_number) * scale_block_bytes;
        let mut regions = Vec::with_capacity(layout.region_count() as usize);
        for (layer, &key) in keys.iter().enumerate() {
            regions.push(Self::checked_region("localKeyCache", layer, key, len)?);
            if let Some(&value) = values.get(layer) {
                regions.push(Self::checked_region("localValueCache", layer, value, len)?);
            }
            if let Some(&scale) = key_scales.get(layer) {
                regions.push(Self::checked_region(
                    "keyScaleCache",
                    layer,
                    scale,
                    scale_len,
                )?);
            }
            if let Some(&scale) = value_scales.get(layer) {
                regions.push(Self::checked_region(
                    "valueScaleCache",
                    layer,
                    scale,
                    scale_len,
                )?);
            }
        }
        let memory = vec![MemoryKind::Host; regions.len()];
        Ok(RegionTable {
            layout,
            regions,
            memory,
            gpu: None,
            imports: Arc::new([]),
        })
    }

    fn checked_region(name: &'static str, layer: usize, addr: u64, len: u64) -> Result<Region> {
        if addr == 0 {
            return Err(Error::invalid(
                name,
                format!("region {layer} has address 0"),
            ));
        }
        if addr
            .checked_add(len)
            .is_none_or(|end| end > isize::MAX as u64)
        {
            return Err(Error::RegionOverflow {
                what: format!("{name}[{layer}] at {addr:#x} + {len} bytes passes the end of the address space"),
            });
        }
        Ok(Region { addr, len })
    }

    /// Every region, in region-index order (layer-major; K, V, K-scale, V-scale).
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// Region `index`, or `None` when out of range.
    pub fn get(&self, index: u32) -> Option<Region> {
        self.regions.get(index as usize).copied()
    }

    /// Records each region's memory kind (one per region) and the GPU that serves them.
    pub fn set_memory(&mut self, kinds: Vec<MemoryKind>, gpu: u32) {
        assert_eq!(
            kinds.len(),
            self.regions.len(),
            "one memory kind per region"
        );
        self.gpu = kinds.iter().any(|k| k.is_device()).then_some(gpu);
        self.memory = kinds;
    }

    /// The memory kind of region `index` (`Host` for an index out of range).
    #[inline]
    pub fn memory(&self, index: u32) -> MemoryKind {
        self.memory.get(index as usize).copied().unwrap_or_default()
    }

    /// Every region's memory kind, in region order.
    pub fn memory_kinds(&self) -> &[MemoryKind] {
        &self.memory
    }

    /// The CUDA device whose context copies device regions; `None` when all are host memory.
    #[inline]
    pub fn gpu(&self) -> Option<u32> {
        self.gpu
    }
}

/// Scale regions: one per layer for K (and for V when present) exactly when
/// `scale_block_bytes` > 0, none otherwise.
fn check_scales(
    keys: &[u64],
    values: &[u64],
    key_scales: &[u64],
    value_scales: &[u64],
    scale_block_bytes: u64,
) -> Result<()> {
    if scale_block_bytes == 0 {
        for (name, given) in [
            ("keyScaleCache", key_scales),
            ("valueScaleCache", value_scales),
        ] {
            if !given.is_empty() {
                return Err(Error::invalid(
                    name,
                    format!(
                        "{} regions given but scaleBlockBytes is 0; give scaleBlockBytes > 0 or no scale regions",
                        given.len()
                    ),
                ));
            }
        }
        return Ok(());
    }
    for (name, given, wanted, of) in [
        ("keyScaleCache", key_scales, keys.len(), "localKeyCache"),
        (
            "valueScaleCache",
            value_scales,
            values.len(),
            "localValueCache",
        ),
    ] {
        if given.len() != wanted {
            return Err(Error::invalid(
                name,
                format!(
                    "{} regions given but {of} has {wanted}; with scaleBlockBytes {scale_block_bytes} give one scale region per {of} region",
                    given.len()
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_overflowing_regions() {
        let err = CacheLayout::new(1, true, u32::MAX, u64::MAX / 2).unwrap_err();
        assert_eq!(err.code(), "ERR_REGION_OVERFLOW");
        assert!(err.to_string().contains("blockNumber 4294967295"));
        let err = RegionTable::new(&[u64::MAX - 10], &[], 4, 8).unwrap_err();
        assert_eq!(err.code(), "ERR_REGION_OVERFLOW");
    }

    #[test]
    fn indexes_key_and_value_regions() {
        let table = RegionTable::new(&[0x1000, 0x3000], &[0x2000, 0x4000], 4, 1024).unwrap();
        let layout = table.layout;
        assert_eq!(layout.region_count(), 4);
        assert_eq!(
            table
                .get(layout.region_index(1, CacheKind::Value))
                .unwrap()
                .addr,
            0x4000
        );
        assert_eq!(
            table
                .get(layout.region_index(1, CacheKind::Key))
                .unwrap()
                .addr,
            0x3000
        );
        let key_only = RegionTable::new(&[0x1000, 0x3000], &[], 4, 1024).unwrap();
        assert_eq!(key_only.layout.region_index(1, CacheKind::Key), 1);
    }

    #[test]
    fn orders_scale_regions_after_key_and_value() {
        let table = RegionTable::with_scales(
            &[0x1000, 0x3000],
            &[0x2000, 0x4000],
            &[0x5000, 0x6000],
            &[0x7000, 0x8000],
            4,
            1024,
            16,
        )
        .unwrap();
        let layout = table.layout;
        assert_eq!((layout.kinds(), layout.region_count()), (4, 8));
        let addrs: Vec<u64> = table.regions().iter().map(|r| r.addr).collect();
        assert_eq!(
            addrs,
            [0x1000, 0x2000, 0x5000, 0x7000, 0x3000, 0x4000, 0x6000, 0x8000]
        );
        assert_eq!(table.regions()[2].len, 64);
        assert_eq!(layout.kind_block_bytes(3), 16);
        assert_eq!(layout.kind_name(3), "valueScaleCache");
        let err = RegionTable::with_scales(&[1, 2], &[3, 4], &[5], &[6, 7], 4, 8, 2).unwrap_err();
        assert_eq!(err.code(), "ERR_INVALID_ARGUMENT");
        assert!(err.to_string().contains("keyScaleCache"), "{err}");
        let err = RegionTable::with_scales(&[1], &[], &[5], &[], 4, 8, 0).unwrap_err();
        assert!(err.to_string().contains("scaleBlockBytes is 0"), "{err}");
        let key_only = RegionTable::with_scales(&[0x1000], &[], &[0x2000], &[], 4, 8, 2).unwrap();
        assert_eq!(key_only.layout.kinds(), 2);
        assert_eq!(key_only.layout.kind_name(1), "keyScaleCache");
    }

    #[test]
    fn rejects_bad_layers_and_mismatched_values() {
        assert_eq!(
            RegionTable::new(&[], &[], 4, 8).unwrap_err().code(),
            "ERR_INVALID_ARGUMENT"
        );
        assert_eq!(
            RegionTable::new(&[1, 2], &[3], 4, 8).unwrap_err().code(),
            "ERR_INVALID_ARGUMENT"
        );
        let layout = CacheLayout::new(3, true, 4, 8).unwrap();
        assert_eq!(layout.check_layer(2.0).unwrap(), 2);
        for bad in [3.0, -1.0, 0.5, f64::NAN] {
            assert_eq!(
                layout.check_layer(bad).unwrap_err().code(),
                "ERR_LAYER_OUT_OF_RANGE"
            );
        }
    }
}
