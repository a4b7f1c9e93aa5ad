//! What a call may ask beyond one-sided delivery ([`Integrity`]): an end-to-end checksum
//! the receiver verifies before it reports the arrival, and a delivery the receiving engine
//! acknowledges. Checked against the peer's link on the caller's thread (a refusal is typed
//! and sends nothing); the call's notice is encoded here, with the writer's shard cover and
//! the checksum of the bytes it moves.

use super::peers::Peer;
use super::Engine;
use crate::error::{Error, Result};
use crate::gpu::checksum::{CrcKernel, GpuSummer};
use crate::plan::Run;
use crate::transport::{source_ranges, sum_call, JobPlan};
use crate::wire::{set_checksum, Landing, Notice};

/// What a call asks beyond one-sided delivery (`checksum`, `delivery` in the API).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Integrity {
    /// `checksum: 'crc32c'`: the writer sums the bytes it moves, the notice carries the sum,
    /// the receiver verifies its memory before it reports the arrival. Needs a tag.
    pub checksum: bool,
    /// `delivery: 'acked'`: the call resolves only after the receiving engine took it (and
    /// its notice) and answered.
    pub acked: bool,
}

/// A call's encoded notice (tagged calls) and landing (checksummed calls to a receiver that
/// finds the bytes from it), as `JobPlan` carries them.
pub(super) type NoticeBytes = (Option<Vec<u8>>, Option<Vec<u8>>);

impl Engine {
    /// Checks `integrity` against `peer`'s link and the layer's memory, and encodes the
    /// call's notice (the checksum is filled in by [`Engine::seal`]) and, for a checksummed
    /// call to a receiver that finds the bytes from it, its landing (refused, typed, when it
    /// is longer than the link carries).
    pub(super) fn notice_for(
        &self,
        peer: &Peer,
        layer: u32,
        (blocks, runs): (u32, &[Run]),
        tag: Option<&[u8]>,
        integrity: Integrity,
    ) -> Result<NoticeBytes> {
        let checks = peer.link.receiver_checks();
        let transport = peer.link.kind().name();
        if integrity.acked && !checks.answers_acked_calls {
            return Err(Error::Unsupported {
                what: "delivery: 'acked'",
                reason: format!(
                    "over {transport} (to {}): its receiver does not answer calls; use transport 'tcp', whose receiver answers every call",
                    peer.key
                ),
            });
        }
        if integrity.checksum {
            if tag.is_none() {
                return Err(Error::invalid(
                    "checksum",
                    "'crc32c' was given without a tag: the receiver verifies the sum when the call's arrival notice comes, and only tagged calls send one",
                ));
            }
            if !checks.verifies_checksums {
                return Err(Error::Unsupported {
                    what: "checksum: 'crc32c'",
                    reason: format!(
                        "over {transport} (to {}): its receiver does not see which bytes a call wrote; use transport 'tcp'",
                        peer.key
                    ),
                });
            }
            if self.layer_on_gpu(layer) {
                let table = &self.inner.table;
                let kinds = table.layout.kinds();
                let host = (layer * kinds..(layer + 1) * kinds)
                    .filter(|&region| !table.memory(region).is_device())
                    .count();
                if host > 0 {
                    return Err(Error::Unsupported {
                        what: "checksum: 'crc32c'",
                        reason: format!(
                            "for layer {layer}: {host} of its {kinds} regions are host memory and the others GPU memory; a checksum covers a layer whose regions are all host or all GPU memory"
                        ),
                    });
                }
                if !checks.sums_gpu_memory {
                    return Err(Error::Unsupported {
                        what: "checksum: 'crc32c'",
                        reason: format!(
                            "for layer {layer} over {transport} (to {}): its regions are GPU memory, which this transport's receiver does not sum; TCP and NVLink do (with the CRC-32C kernel)",
                            peer.key
                        ),
                    });
                }
            }
        }
        let landing = match checks.landing_limit {
            Some(limit) if integrity.checksum => {
                let mut landing = Vec::new();
                Landing::encode(
                    &peer.shard,
                    self.inner.table.layout.kinds(),
                    runs,
                    &mut landing,
                );
                if landing.len() > limit {
                    return Err(Error::Unsupported {
                        what: "checksum: 'crc32c'",
                        reason: format!(
                            "for this call over {transport} (to {}): its {blocks} blocks make {} runs, whose landing (where the receiver finds the bytes) takes {} bytes; a notice carries at most {limit}. Split the call, or list blocks in fewer contiguous runs",
                            peer.key,
                            runs.len(),
                            landing.len()
                        ),
                    });
                }
                Some(landing)
            }
            _ => None,
        };
        let notice = tag.map(|tag| {
            Notice {
                layer,
                blocks,
                cover: peer.shard.cover,
                checksum: integrity.checksum.then_some(0),
                tag,
            }
            .encode()
        });
        Ok((notice, landing))
    }

    /// Whether any region of `layer` is GPU memory.
    fn layer_on_gpu(&self, layer: u32) -> bool {
        let table = &self.inner.table;
        let kinds = table.layout.kinds();
        (layer * kinds..(layer + 1) * kinds).any(|region| table.memory(region).is_device())
    }

    /// Fills in the checksum of a checksummed call's notice: CRC-32C of every byte it moves,
    /// on the CPU for host regions. GPU regions are summed by the CRC-32C kernel: by the
    /// link where it does that itself (`ReceiverChecks::link_sums_gpu_sources`: the notice
    /// keeps its placeholder until then), else here, on the engine's GPU summer, waiting
    /// for it (a CUDA failure fails the call, nothing sent).
    pub(super) fn seal(&self, peer: &Peer, plan: &mut JobPlan, integrity: Integrity) -> Result<()> {
        if !integrity.checksum {
            return Ok(());
        }
        let sum = if self.layer_on_gpu(plan.layer) {
            if peer.link.receiver_checks().link_sums_gpu_sources {
                return Ok(());
            }
            self.sum_on_gpu(plan)?
        } else {
            sum_call(&self.inner.table, plan)
        };
        if let Some(notice) = plan.notice.as_mut() {
            set_checksum(notice, sum);
        }
        Ok(())
    }

    /// CRC-32C of the bytes `plan` moves from GPU regions (the layer's regions are all GPU
    /// memory of the GPU whose context copies them: `notice_for` refused the rest).
    fn sum_on_gpu(&self, plan: &JobPlan) -> Result<u32> {
        let table = &self.inner.table;
        let mut summer = crate::util::lock(&self.inner.gpu_summer);
        if summer.is_none() {
            let gpu = crate::gpu::driver()?.gpu(table.gpu().unwrap_or(0))?;
            *summer = Some(GpuSummer::new(&CrcKernel::new(gpu))?);
        }
        let summer = summer.as_mut().expect("made above");
        let mut ranges = Vec::new();
        source_ranges(table, plan, |addr, len| ranges.push((addr, len)));
        // SAFETY: the planner checked every block id against this side's regions, so each
        // range lies in a registered device region, valid while the engine lives; only read.
        Ok(unsafe { summer.sum(ranges) }?)
    }
}
