//! The GPU decoder: uploads containers and their decode plan, launches the kernels of
//! `cu/decode.cu`, and checks what they report.

use std::ops::Range;
use std::sync::{Arc, Mutex};

use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DriverError,
    LaunchConfig, PushKernelArg,
};
use kvault_codec::plan::{DecodePlan, PlanRecord, as_bytes};
use rayon::prelude::*;

use crate::compile::decode_ptx;
use crate::{KernelError, OutDtype, OutLayout};

fn cuda(e: DriverError) -> KernelError {
    KernelError::Cuda(e.to_string())
}

/// Finds the driver and a device, or says why not (never panics: cudarc's dynamic loading
/// would panic on first use without `libcuda`).
fn driver_ready(ordinal: usize) -> Result<(), KernelError> {
    // SAFETY: only probes whether the shared library loads.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(KernelError::NoGpu("libcuda not found (no NVIDIA driver)".into()));
    }
    match CudaContext::device_count() {
        Ok(n) if (ordinal as i64) < i64::from(n) => Ok(()),
        Ok(n) => Err(KernelError::NoGpu(format!(
            "device {ordinal} requested, {n} present"
        ))),
        Err(e) => Err(KernelError::NoGpu(format!("CUDA driver: {e}"))),
    }
}

/// The name of device 0, if a GPU is usable.
pub(crate) fn probe() -> Result<String, KernelError> {
    driver_ready(0)?;
    let ctx = CudaContext::new(0).map_err(|e| KernelError::NoGpu(e.to_string()))?;
    ctx.name().map_err(cuda)
}

/// Where a decode writes: caller-owned device memory.
pub enum Target<'a> {
    /// The canonical layout `[layers, 2, tokens, kv_heads, head_dim]` (tokens of every
    /// chunk in order), exactly sized for the plan.
    Canonical(&'a mut CudaSlice<u8>),
    /// vLLM-style paged caches: per output layer a K and a V cache
    /// `[num_blocks, block_size, kv_heads, head_dim]`; token `t` of the batch goes to block
    /// `block_table[t / block_size]`.
    Paged {
        /// K cache of each output layer.
        k: &'a mut [CudaSlice<u8>],
        /// V cache of each output layer.
        v: &'a mut [CudaSlice<u8>],
        /// Rows per block.
        block_size: u32,
        /// Block id of each run of `block_size` tokens.
        block_table: &'a [u32],
    },
}

struct Kernels {
    build_tables: CudaFunction,
    rans: CudaFunction,
    q8: CudaFunction,
    cachegen: CudaFunction,
    _module: Arc<CudaModule>,
}

/// Device buffers kept between calls (grow-only).
struct Scratch {
    input: Option<CudaSlice<u8>>,
    plan: Option<CudaSlice<u8>>,
    tables: Option<CudaSlice<u32>>,
    err: CudaSlice<u32>,
}

/// A CUDA decoder for codec containers on one device. Kernels are compiled once per
/// process (NVRTC, for the device's own architecture) and cached.
pub struct GpuDecoder {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    copy: Arc<CudaStream>,
    k: Kernels,
    name: String,
    arch: String,
    scratch: Mutex<Scratch>,
}

/// Section alignment inside the uploaded plan buffer.
const ALIGN: usize = 256;

/// Offsets of a plan's arrays inside one uploaded buffer.
#[derive(Default)]
struct Packed {
    bytes: Vec<u8>,
}

impl Packed {
    fn push<T: PlanRecord>(&mut self, v: &[T]) -> u64 {
        let at = self.bytes.len().next_multiple_of(ALIGN);
        self.bytes.resize(at, 0);
        self.bytes.extend_from_slice(as_bytes(v));
        at as u64
    }
}

impl GpuDecoder {
    /// Opens device `ordinal`, compiling the kernels for it on first use in this process.
    pub fn new(ordinal: usize) -> Result<GpuDecoder, KernelError> {
        driver_ready(ordinal)?;
        let ctx = CudaContext::new(ordinal).map_err(|e| KernelError::NoGpu(e.to_string()))?;
        let (major, minor) = ctx.compute_capability().map_err(cuda)?;
        let arch = format!("sm_{major}{minor}");
        let module = ctx.load_module(decode_ptx(&arch)?).map_err(cuda)?;
        let f = |n: &str| module.load_function(n).map_err(cuda);
        let k = Kernels {
            build_tables: f("rans_build_tables")?,
            rans: f("rans_decode")?,
            q8: f("q8_decode")?,
            cachegen: f("cachegen_decode")?,
            _module: module.clone(),
        };
        let stream = ctx.new_stream().map_err(cuda)?;
        let copy = ctx.new_stream().map_err(cuda)?;
        let err = stream.clone_htod(&[0u32, u32::MAX]).map_err(cuda)?;
        Ok(GpuDecoder {
            name: ctx.name().map_err(cuda)?,
            ctx,
            stream,
            copy,
            k,
            arch,
            scratch: Mutex::new(Scratch {
                input: None,
                plan: None,
                tables: None,
                err,
            }),
        })
    }

    /// The CUDA context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream decodes run on; a decode has finished when its call returns.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The device's name.
    pub fn device_name(&self) -> &str {
        &self.name
    }

    /// The architecture the kernels were compiled for (`sm_90` on Hopper).
    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// Decodes `blobs` (containers in host memory; chunks of one prefix in token order) into
    /// `target`, selecting `layers` of each (`None`: all). Returns when the output is
    /// complete and checked.
    pub fn decode(
        &self,
        blobs: &[&[u8]],
        layers: Option<Range<u32>>,
        dtype: OutDtype,
        target: Target<'_>,
    ) -> Result<(), KernelError> {
        self.decode_pipelined(blobs, layers, dtype, target, 1)
    }

    /// As [`decode`](Self::decode), in `batches` groups of chunks: the host-to-device copy
    /// of one group (on a copy stream) overlaps the decoding of the previous one. With
    /// `blobs` in pinned host memory the copies are true DMA transfers.
    pub fn decode_pipelined(
        &self,
        blobs: &[&[u8]],
        layers: Option<Range<u32>>,
        dtype: OutDtype,
        mut target: Target<'_>,
        batches: usize,
    ) -> Result<(), KernelError> {
        if blobs.is_empty() {
            return Ok(());
        }
        // Plans of every chunk in parallel (parsing includes each container's checksum).
        let plans: Vec<DecodePlan> = blobs
            .par_iter()
            .map(|b| DecodePlan::of_container(b, layers.clone()))
            .collect::<Result<_, _>>()?;
        let (channels, nl) = (plans[0].channels, plans[0].layers);
        let mut tokens = 0u32;
        for p in &plans {
            if p.channels != channels || p.layers != nl {
                return Err(KernelError::Layout(
                    "chunks of different shapes in one decode".into(),
                ));
            }
            tokens = tokens
                .checked_add(p.tokens)
                .ok_or_else(|| KernelError::Layout("too many tokens".into()))?;
        }
        let mut scratch = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        let (layout, _guards) = self.layout(&mut target, nl, tokens, channels, dtype)?;
        // One device input buffer holding every chunk; each group is copied into its place.
        let total: usize = blobs.iter().map(|b| b.len()).sum();
        self.grow_input(&mut scratch, total)?;
        let groups = batches.clamp(1, blobs.len());
        let per = blobs.len().div_ceil(groups);
        let (mut at, mut tok) = (0usize, 0u32);
        for (gi, (group, gplans)) in blobs.chunks(per).zip(plans.chunks(per)).enumerate() {
            let mut plan = DecodePlan::new();
            let (start, mut off) = (at, 0u64);
            for (b, p) in group.iter().zip(gplans) {
                plan.merge(p, off, tok)?;
                off += b.len() as u64;
                tok += p.tokens;
            }
            // Copy the group on the copy stream; the decode stream waits for it.
            let input = scratch
                .input
                .as_mut()
                .ok_or_else(|| KernelError::Cuda("no input buffer".into()))?;
            for b in group {
                let mut dst = input.slice_mut(at..at + b.len());
                self.copy.memcpy_htod(*b, &mut dst).map_err(cuda)?;
                at += b.len();
            }
            let ready = self.copy.record_event(None).map_err(cuda)?;
            self.stream.wait(&ready).map_err(cuda)?;
            let base = {
                let input = scratch
                    .input
                    .as_ref()
                    .ok_or_else(|| KernelError::Cuda("no input buffer".into()))?;
                let (ptr, _sync) = input.device_ptr(&self.stream);
                ptr + start as u64
            };
            self.enqueue(&mut scratch, &plan, base, &layout, dtype)
                .map_err(|e| match e {
                    KernelError::Layout(m) => KernelError::Layout(format!("group {gi}: {m}")),
                    e => e,
                })?;
        }
        self.finish(&mut scratch)
    }

    /// Decodes `plan`, whose input bytes are already on the device at `input` (input
    /// offset 0 of the plan = byte 0 of `input`), into `target`.
    pub fn decode_plan(
        &self,
        plan: &DecodePlan,
        input: &CudaSlice<u8>,
        dtype: OutDtype,
        mut target: Target<'_>,
    ) -> Result<(), KernelError> {
        if plan.input_bytes > input.len() as u64 {
            return Err(KernelError::Layout(format!(
                "plan reads {} input bytes, the device buffer has {}",
                plan.input_bytes,
                input.len()
            )));
        }
        let mut scratch = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        let (layout, _guards) = self.layout(&mut target, plan.layers, plan.tokens, plan.channels, dtype)?;
        let (base, _sync) = input.device_ptr(&self.stream);
        self.enqueue(&mut scratch, plan, base, &layout, dtype)?;
        self.finish(&mut scratch)
    }

    /// Output addresses for a target, after checking its sizes.
    #[allow(clippy::type_complexity)]
    fn layout<'t>(
        &'t self,
        target: &'t mut Target<'_>,
        layers: u32,
        tokens: u32,
        channels: u32,
        dtype: OutDtype,
    ) -> Result<(OutLayout, Vec<cudarc::driver::SyncOnDrop<'t>>), KernelError> {
        let row = u64::from(channels) * dtype.size() as u64;
        match target {
            Target::Canonical(out) => {
                let want = 2 * u64::from(layers) * u64::from(tokens) * row;
                if out.len() as u64 != want {
                    return Err(KernelError::Layout(format!(
                        "canonical output of {} bytes, the chunks decode to {want}",
                        out.len()
                    )));
                }
                let (ptr, sync) = out.device_ptr_mut(&self.stream);
                Ok((
                    OutLayout::canonical(ptr, layers, tokens, channels, dtype),
                    vec![sync],
                ))
            }
            Target::Paged {
                k,
                v,
                block_size,
                block_table,
            } => {
                if k.len() != layers as usize || v.len() != layers as usize {
                    return Err(KernelError::Layout(format!(
                        "{} K and {} V caches for {layers} layers",
                        k.len(),
                        v.len()
                    )));
                }
                let block_bytes = u64::from(*block_size) * row;
                let capacity = k
                    .iter()
                    .chain(v.iter())
                    .map(|c| c.len() as u64 / block_bytes.max(1))
                    .min()
                    .unwrap_or(0);
                let mut guards = Vec::new();
                let mut kp = Vec::new();
                let mut vp = Vec::new();
                for c in k.iter_mut() {
                    let (p, g) = c.device_ptr_mut(&self.stream);
                    kp.push(p);
                    guards.push(g);
                }
                for c in v.iter_mut() {
                    let (p, g) = c.device_ptr_mut(&self.stream);
                    vp.push(p);
                    guards.push(g);
                }
                let layout = OutLayout::paged(&kp, &vp, *block_size, block_table, capacity, tokens)?;
                Ok((layout, guards))
            }
        }
    }

    fn grow_input(&self, s: &mut Scratch, len: usize) -> Result<(), KernelError> {
        if s.input.as_ref().is_none_or(|b| b.len() < len) {
            self.stream.synchronize().map_err(cuda)?;
            s.input = None;
            // SAFETY: every byte a kernel reads is copied in before the kernel runs.
            s.input = Some(unsafe { self.stream.alloc::<u8>(len.max(1)) }.map_err(cuda)?);
        }
        Ok(())
    }

    /// Uploads a plan and launches its kernels on the decode stream (no wait).
    fn enqueue(
        &self,
        s: &mut Scratch,
        plan: &DecodePlan,
        input: u64,
        layout: &OutLayout,
        dtype: OutDtype,
    ) -> Result<(), KernelError> {
        if plan.is_empty() {
            return Ok(());
        }
        let mut packed = Packed::default();
        let r = &plan.rans;
        let rs = packed.push(&r.streams);
        let rp = packed.push(&r.parts);
        let rf = packed.push(&r.freqs);
        let rst = packed.push(&r.steps);
        let rb = packed.push(&r.biases);
        let re = packed.push(&r.escapes);
        let qp = packed.push(&plan.q8.parts);
        let ql = packed.push(&plan.q8.lo_step);
        let g = &plan.cachegen;
        let cs = packed.push(&g.streams);
        let cp = packed.push(&g.parts);
        let csc = packed.push(&g.scales);
        let cc = packed.push(&g.cdfs);
        let slots: Vec<u32> = layout
            .slots
            .iter()
            .flat_map(|&a| [a as u32, (a >> 32) as u32])
            .collect();
        let sl = packed.push(&slots);
        let bt = packed.push(&layout.block_table);
        packed.bytes.resize(packed.bytes.len().next_multiple_of(ALIGN), 0);
        if s.plan.as_ref().is_none_or(|b| b.len() < packed.bytes.len()) {
            self.stream.synchronize().map_err(cuda)?;
            s.plan = None;
            // SAFETY: filled by the copy below before any kernel reads it.
            s.plan = Some(unsafe { self.stream.alloc::<u8>(packed.bytes.len()) }.map_err(cuda)?);
        }
        let plan_buf = s
            .plan
            .as_mut()
            .ok_or_else(|| KernelError::Cuda("no plan buffer".into()))?;
        self.stream
            .memcpy_htod(&packed.bytes, &mut plan_buf.slice_mut(..packed.bytes.len()))
            .map_err(cuda)?;
        let base = {
            let (p, _sync) = plan_buf.device_ptr(&self.stream);
            p
        };
        let err = {
            let (p, _sync) = s.err.device_ptr(&self.stream);
            p
        };
        let (channels, dt, bsz) = (plan.channels, dtype as u32, layout.block_size);
        let (slots_p, table_p) = (base + sl, base + bt);

        if !r.parts.is_empty() {
            let n_parts = r.parts.len() as u32;
            let need = r.parts.len() * 4096;
            if s.tables.as_ref().is_none_or(|t| t.len() < need) {
                self.stream.synchronize().map_err(cuda)?;
                s.tables = None;
                // SAFETY: rans_build_tables writes every slot before rans_decode reads it.
                s.tables = Some(unsafe { self.stream.alloc::<u32>(need) }.map_err(cuda)?);
            }
            let tables = {
                let t = s
                    .tables
                    .as_ref()
                    .ok_or_else(|| KernelError::Cuda("no table buffer".into()))?;
                let (p, _sync) = t.device_ptr(&self.stream);
                p
            };
            let freqs = base + rf;
            let mut b = self.stream.launch_builder(&self.k.build_tables);
            b.arg(&freqs).arg(&tables).arg(&n_parts);
            // SAFETY: arguments match the kernel's signature; tables holds n_parts * 4096.
            unsafe { b.launch(config(n_parts, 256)) }.map_err(cuda)?;
            let n_streams = u32::try_from(r.streams.len())
                .ok()
                .filter(|&n| n < u32::MAX / 8)
                .ok_or_else(|| KernelError::Layout("too many streams".into()))?;
            let (streams, parts, steps, biases, escapes) =
                (base + rs, base + rp, base + rst, base + rb, base + re);
            let mut b = self.stream.launch_builder(&self.k.rans);
            b.arg(&input)
                .arg(&streams)
                .arg(&n_streams)
                .arg(&parts)
                .arg(&tables)
                .arg(&steps)
                .arg(&biases)
                .arg(&escapes)
                .arg(&slots_p)
                .arg(&table_p)
                .arg(&bsz)
                .arg(&channels)
                .arg(&dt)
                .arg(&err);
            // SAFETY: as above; every index the kernel follows was checked by the planner.
            unsafe { b.launch(config((n_streams * 8).div_ceil(256), 256)) }.map_err(cuda)?;
        }
        if !plan.q8.parts.is_empty() {
            let (parts, lo) = (base + qp, base + ql);
            let max_n = plan
                .q8
                .parts
                .iter()
                .map(|p| u64::from(p.tokens) * u64::from(channels))
                .max()
                .unwrap_or(0);
            let gx = max_n.div_ceil(256).clamp(1, 4096) as u32;
            for first in (0..plan.q8.parts.len()).step_by(65_535) {
                let count = (plan.q8.parts.len() - first).min(65_535) as u32;
                let part_base = first as u32;
                let mut b = self.stream.launch_builder(&self.k.q8);
                b.arg(&input)
                    .arg(&parts)
                    .arg(&part_base)
                    .arg(&lo)
                    .arg(&slots_p)
                    .arg(&table_p)
                    .arg(&bsz)
                    .arg(&channels)
                    .arg(&dt);
                let cfg = LaunchConfig {
                    grid_dim: (gx, count, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                };
                // SAFETY: arguments match the kernel's signature.
                unsafe { b.launch(cfg) }.map_err(cuda)?;
            }
        }
        if !g.streams.is_empty() {
            let n_streams =
                u32::try_from(g.streams.len()).map_err(|_| KernelError::Layout("too many streams".into()))?;
            let (streams, parts, scales, cdfs) = (base + cs, base + cp, base + csc, base + cc);
            let mut b = self.stream.launch_builder(&self.k.cachegen);
            b.arg(&input)
                .arg(&streams)
                .arg(&n_streams)
                .arg(&parts)
                .arg(&scales)
                .arg(&cdfs)
                .arg(&slots_p)
                .arg(&table_p)
                .arg(&bsz)
                .arg(&channels)
                .arg(&dt)
                .arg(&err);
            // SAFETY: arguments match the kernel's signature.
            unsafe { b.launch(config(n_streams.div_ceil(128), 128)) }.map_err(cuda)?;
        }
        Ok(())
    }

    /// Waits for the decode stream and turns the kernels' error word into a result.
    fn finish(&self, s: &mut Scratch) -> Result<(), KernelError> {
        let err = self.stream.clone_dtoh(&s.err).map_err(cuda)?;
        self.stream.synchronize().map_err(cuda)?;
        if err.first().copied().unwrap_or(0) != 0 {
            self.stream
                .memcpy_htod(&[0u32, u32::MAX], &mut s.err)
                .map_err(cuda)?;
            let (flags, stream) = (err[0], err.get(1).copied().unwrap_or(u32::MAX));
            let mut what = Vec::new();
            for (bit, name) in [
                (1, "rANS state"),
                (2, "rANS word count"),
                (4, "escape count"),
                (8, "cachegen renormalisation"),
            ] {
                if flags & bit != 0 {
                    what.push(name);
                }
            }
            return Err(KernelError::Corrupt(format!(
                "{} check failed (first stream {stream})",
                what.join(", ")
            )));
        }
        Ok(())
    }
}

fn config(grid: u32, block: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid.max(1), 1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    }
}
