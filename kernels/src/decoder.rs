//! The GPU decoder: uploads containers and their decode plan, launches the kernels of
//! `cu/decode.cu`, and checks what they report.

use std::ops::Range;
use std::sync::{Arc, Mutex};

use cudarc::driver::{
    CudaContext, CudaEvent, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DevicePtrMut,
    DriverError, LaunchConfig, PinnedHostSlice, PushKernelArg, sys,
};
use kvault_codec::plan::{DecodePlan, NOT_PREDICTED, as_bytes};
use rayon::prelude::*;

use crate::compile::ptx;
use crate::{KernelError, OutDtype, OutLayout};

pub(crate) fn cuda(e: DriverError) -> KernelError {
    KernelError::Cuda(e.to_string())
}

/// Finds the driver and a device, or says why not (never panics: cudarc's dynamic loading
/// would panic on first use without `libcuda`).
pub(crate) fn driver_ready(ordinal: usize) -> Result<(), KernelError> {
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
    /// rans_decode per output dtype (f16, bf16, f32).
    rans: [CudaFunction; 3],
    q8: CudaFunction,
    cachegen: CudaFunction,
    scatter: CudaFunction,
    exact_rows: CudaFunction,
    _module: Arc<CudaModule>,
}

/// Device buffers kept between calls (grow-only).
struct Scratch {
    input: Option<CudaSlice<u8>>,
    plan: Option<CudaSlice<u8>>,
    tables: Option<CudaSlice<u8>>,
    err: CudaSlice<u32>,
    /// Events around each enqueued plan's kernels, for [`GpuDecoder::last_kernel_ms`].
    timings: Vec<(CudaEvent, CudaEvent)>,
    /// Kernel time of the last completed decode.
    last_ms: Option<f32>,
    /// Pinned host staging for plan uploads (true async DMA), and how much of it the
    /// plans enqueued since the last [`GpuDecoder::finish`] occupy.
    staging: Option<PinnedHostSlice<u8>>,
    staging_used: usize,
    /// Plans of the chunks and of a group, reused between calls so that planning touches
    /// no fresh memory (page faults dominated it).
    chunk_plans: Vec<DecodePlan>,
    group_plan: DecodePlan,
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

/// Compressed bytes below which a pipelined decode does not split into another group.
const MIN_GROUP_BYTES: usize = 8 << 20;

/// Section alignment inside the uploaded plan buffer.
const ALIGN: usize = 256;
/// Shared memory the rANS kernel may use for predicted parts' state (the default limit
/// less the kernel's 4.3 KiB of tables).
const SHARED_STATE_BYTES: u32 = 40 << 10;

impl GpuDecoder {
    /// Opens device `ordinal`, compiling the kernels for it on first use in this process.
    pub fn new(ordinal: usize) -> Result<GpuDecoder, KernelError> {
        driver_ready(ordinal)?;
        let ctx = CudaContext::new(ordinal).map_err(|e| KernelError::NoGpu(e.to_string()))?;
        // The decoder orders its copy and decode streams with explicit events; cudarc's
        // implicit per-buffer events would serialise a group's copy behind the previous
        // group's decode (they share the input buffer) and undo the pipelining.
        // SAFETY: no allocation of this context is in use by other streams yet.
        unsafe { ctx.disable_event_tracking() };
        let (major, minor) = ctx.compute_capability().map_err(cuda)?;
        let arch = format!("sm_{major}{minor}");
        let module = ctx.load_module(ptx("decode.cu", &arch)?).map_err(cuda)?;
        let f = |n: &str| module.load_function(n).map_err(cuda);
        let k = Kernels {
            build_tables: f("rans_build_tables")?,
            rans: [
                f("rans_decode_f16")?,
                f("rans_decode_bf16")?,
                f("rans_decode_f32")?,
            ],
            q8: f("q8_decode")?,
            cachegen: f("cachegen_decode")?,
            scatter: f("scatter_rows")?,
            exact_rows: f("exact_rows")?,
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
                timings: Vec::new(),
                last_ms: None,
                staging: None,
                staging_used: 0,
                chunk_plans: Vec::new(),
                group_plan: DecodePlan::new(),
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

    /// As [`decode`](Self::decode), in up to `batches` groups of chunks (fewer for small
    /// inputs, at least 8 MiB of compressed bytes per group): every group's host-to-device
    /// copy starts at once on a copy stream while the host plans the chunks in parallel,
    /// and each group decodes as soon as its bytes have arrived. With `blobs` in pinned host
    /// memory the copies are true DMA transfers.
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
        let mut scratch = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        // A call that failed half-way may have left kernels reading the input buffer.
        self.stream.synchronize().map_err(cuda)?;
        // 1. Every group's bytes start copying at once (copy stream, one event per group)...
        let total: usize = blobs.iter().map(|b| b.len()).sum();
        self.grow_input(&mut scratch, total)?;
        // Groups pay off only when copies are long enough to hide a decode behind: each
        // group's kernels take as long per lane as one big launch (the decoder is
        // latency-bound), so small batches go in one group.
        let groups = batches
            .clamp(1, blobs.len())
            .min(total.div_ceil(MIN_GROUP_BYTES).max(1));
        let per = blobs.len().div_ceil(groups);
        let mut copied = Vec::with_capacity(groups);
        {
            let input = scratch
                .input
                .as_mut()
                .ok_or_else(|| KernelError::Cuda("no input buffer".into()))?;
            let mut at = 0usize;
            for group in blobs.chunks(per) {
                let start = at;
                for b in group {
                    let mut dst = input.slice_mut(at..at + b.len());
                    self.copy.memcpy_htod(*b, &mut dst).map_err(cuda)?;
                    at += b.len();
                }
                copied.push((start, self.copy.record_event(None).map_err(cuda)?));
            }
        }
        // 2. ...while the host plans every chunk in parallel (parsing checks each checksum).
        let mut plans = std::mem::take(&mut scratch.chunk_plans);
        plans.resize_with(blobs.len().max(plans.len()), DecodePlan::new);
        let result = self.plan_and_enqueue(
            &mut scratch,
            &mut plans,
            blobs,
            layers,
            dtype,
            &mut target,
            per,
            &copied,
        );
        scratch.chunk_plans = plans;
        if let Err(e) = result {
            self.abandon(&mut scratch)?;
            return Err(e);
        }
        self.finish(&mut scratch)
    }

    /// After a failure half-way through enqueueing: waits for what was enqueued and resets
    /// the per-call state, so the next call starts clean.
    fn abandon(&self, s: &mut Scratch) -> Result<(), KernelError> {
        self.copy.synchronize().map_err(cuda)?;
        self.stream.synchronize().map_err(cuda)?;
        s.staging_used = 0;
        s.timings.clear();
        self.stream
            .memcpy_htod(&[0u32, u32::MAX], &mut s.err)
            .map_err(cuda)?;
        self.stream.synchronize().map_err(cuda)
    }

    /// Plans every chunk (in parallel) and enqueues each group's decode behind its copy.
    #[allow(clippy::too_many_arguments)]
    fn plan_and_enqueue(
        &self,
        scratch: &mut Scratch,
        plans: &mut [DecodePlan],
        blobs: &[&[u8]],
        layers: Option<Range<u32>>,
        dtype: OutDtype,
        target: &mut Target<'_>,
        per: usize,
        copied: &[(usize, CudaEvent)],
    ) -> Result<(), KernelError> {
        let plans = &mut plans[..blobs.len()];
        plans
            .par_iter_mut()
            .zip(blobs.par_iter())
            .try_for_each(|(p, b)| p.plan_container(b, layers.clone()))?;
        let (channels, nl) = (plans[0].channels, plans[0].layers);
        let mut tokens = 0u32;
        for p in plans.iter() {
            if p.channels != channels || p.layers != nl {
                return Err(KernelError::Layout(
                    "chunks of different shapes in one decode".into(),
                ));
            }
            tokens = tokens
                .checked_add(p.tokens)
                .ok_or_else(|| KernelError::Layout("too many tokens".into()))?;
        }
        let (layout, _guards) = self.layout(target, nl, tokens, channels, dtype)?;
        let input_base = {
            let input = scratch
                .input
                .as_ref()
                .ok_or_else(|| KernelError::Cuda("no input buffer".into()))?;
            let (ptr, _sync) = input.device_ptr(&self.stream);
            ptr
        };
        // 3. Each group decodes as soon as its bytes are on the device.
        let mut group = std::mem::take(&mut scratch.group_plan);
        let mut tok = 0u32;
        let mut result = Ok(());
        for ((chunk, gplans), (start, ready)) in blobs.chunks(per).zip(plans.chunks(per)).zip(copied) {
            group.clear();
            let mut off = 0u64;
            for (b, p) in chunk.iter().zip(gplans) {
                if let Err(e) = group.merge(p, off, tok) {
                    result = Err(e.into());
                    break;
                }
                off += b.len() as u64;
                tok += p.tokens;
            }
            if result.is_ok() {
                result =
                    self.stream.wait(ready).map_err(cuda).and_then(|()| {
                        self.enqueue(scratch, &group, input_base + *start as u64, &layout, dtype)
                    });
            }
            if result.is_err() {
                break;
            }
        }
        scratch.group_plan = group;
        result
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
        if let Err(e) = self.enqueue(&mut scratch, plan, base, &layout, dtype) {
            self.abandon(&mut scratch)?;
            return Err(e);
        }
        self.finish(&mut scratch)
    }

    /// Copies an already decoded canonical tensor (`[layers, 2, tokens, kv_heads,
    /// head_dim]` in `dtype`, host memory) into `target`: the path for chunks whose profile
    /// has no GPU decoder (lossless), decoded on the CPU.
    pub fn upload_canonical(
        &self,
        host: &[u8],
        layers: u32,
        tokens: u32,
        channels: u32,
        dtype: OutDtype,
        mut target: Target<'_>,
    ) -> Result<(), KernelError> {
        let row = channels as usize * dtype.size();
        let want = 2 * layers as usize * tokens as usize * row;
        if host.len() != want {
            return Err(KernelError::Layout(format!(
                "canonical host tensor of {} bytes, {layers} layers of {tokens} tokens need {want}",
                host.len()
            )));
        }
        let mut scratch = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        self.stream.synchronize().map_err(cuda)?;
        if let Target::Canonical(out) = &mut target {
            if out.len() != want {
                return Err(KernelError::Layout(format!(
                    "canonical output of {} bytes for {want} decoded bytes",
                    out.len()
                )));
            }
            self.stream.memcpy_htod(host, &mut **out).map_err(cuda)?;
            return self.stream.synchronize().map_err(cuda);
        }
        self.grow_input(&mut scratch, want)?;
        let (layout, _guards) = self.layout(&mut target, layers, tokens, channels, dtype)?;
        let input = scratch
            .input
            .as_mut()
            .ok_or_else(|| KernelError::Cuda("no input buffer".into()))?;
        self.stream
            .memcpy_htod(host, &mut input.slice_mut(..want))
            .map_err(cuda)?;
        let slots = self.stream.clone_htod(&layout.slots).map_err(cuda)?;
        let table = self.stream.clone_htod(&layout.block_table).map_err(cuda)?;
        let (src, rb, bs) = (
            {
                let (p, _s) = input.device_ptr(&self.stream);
                p
            },
            row as u32,
            layout.block_size,
        );
        if tokens > 0 && layers > 0 {
            let mut b = self.stream.launch_builder(&self.k.scatter);
            b.arg(&src).arg(&tokens).arg(&rb).arg(&slots).arg(&table).arg(&bs);
            let cfg = LaunchConfig {
                grid_dim: (tokens, 2 * layers, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: arguments match the kernel; the layout was checked against the caches.
            unsafe { b.launch(cfg) }.map_err(cuda)?;
        }
        self.stream.synchronize().map_err(cuda)
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
            self.copy.synchronize().map_err(cuda)?;
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
        let r = &plan.rans;
        let g = &plan.cachegen;
        let slots: Vec<u32> = layout
            .slots
            .iter()
            .flat_map(|&a| [a as u32, (a >> 32) as u32])
            .collect();
        // Every array of the plan in one upload, each section 256-byte aligned.
        let sections: [&[u8]; 16] = [
            as_bytes(&r.streams),
            as_bytes(&r.parts),
            as_bytes(&r.freqs),
            as_bytes(&r.steps),
            as_bytes(&r.biases),
            as_bytes(&r.escapes),
            as_bytes(&plan.q8.parts),
            as_bytes(&plan.q8.lo_step),
            as_bytes(&g.streams),
            as_bytes(&g.parts),
            as_bytes(&g.scales),
            as_bytes(&g.cdfs),
            as_bytes(&slots),
            as_bytes(&layout.block_table),
            as_bytes(&r.exact_rows),
            &r.rho,
        ];
        let mut offsets = [0u64; 16];
        let mut total = 0usize;
        for (o, sec) in offsets.iter_mut().zip(&sections) {
            *o = total as u64;
            total = (total + sec.len()).next_multiple_of(ALIGN);
        }
        let [rs, rp, rf, rst, rb, re, qp, ql, cs, cp, csc, cc, sl, bt, ex, rh] = offsets;
        // Stage in pinned memory: the copy is then a true asynchronous DMA. Plans of one
        // call take consecutive regions, since earlier ones may still be in flight.
        if s.staging
            .as_ref()
            .is_none_or(|b| b.len() < s.staging_used + total)
        {
            self.stream.synchronize().map_err(cuda)?;
            let cap = (2 * (s.staging_used + total)).max(1 << 20);
            s.staging = None;
            s.staging_used = 0;
            // SAFETY: every byte uploaded is written below first.
            s.staging = Some(unsafe { self.ctx.alloc_pinned_with_flags::<u8>(cap, 0) }.map_err(cuda)?);
        }
        let at = s.staging_used;
        let staging = s
            .staging
            .as_mut()
            .ok_or_else(|| KernelError::Cuda("no staging buffer".into()))?;
        {
            let host = staging.as_mut_slice().map_err(cuda)?;
            for (&o, sec) in offsets.iter().zip(&sections) {
                host[at + o as usize..][..sec.len()].copy_from_slice(sec);
            }
        }
        s.staging_used = at + total;
        if s.plan.as_ref().is_none_or(|b| b.len() < total) {
            self.stream.synchronize().map_err(cuda)?;
            s.plan = None;
            // SAFETY: filled by the copy below before any kernel reads it.
            s.plan = Some(unsafe { self.stream.alloc::<u8>(total) }.map_err(cuda)?);
        }
        let plan_buf = s
            .plan
            .as_mut()
            .ok_or_else(|| KernelError::Cuda("no plan buffer".into()))?;
        {
            let staged = &s
                .staging
                .as_ref()
                .ok_or_else(|| KernelError::Cuda("no staging buffer".into()))?
                .as_slice()
                .map_err(cuda)?[at..at + total];
            self.stream
                .memcpy_htod(staged, &mut plan_buf.slice_mut(..total))
                .map_err(cuda)?;
        }
        let base = {
            let (p, _sync) = plan_buf.device_ptr(&self.stream);
            p
        };
        let err = {
            let (p, _sync) = s.err.device_ptr(&self.stream);
            p
        };
        let (channels, dt, bsz) = (plan.channels, dtype as u32, layout.block_size);
        let timed = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
        let start = self.stream.record_event(timed).map_err(cuda)?;
        let (slots_p, table_p) = (base + sl, base + bt);

        if !r.parts.is_empty() {
            let n_parts =
                u32::try_from(r.parts.len()).map_err(|_| KernelError::Layout("too many parts".into()))?;
            let need = r.parts.len() * 4096;
            if s.tables.as_ref().is_none_or(|t| t.len() < need) {
                self.stream.synchronize().map_err(cuda)?;
                s.tables = None;
                // SAFETY: rans_build_tables writes every slot before rans_decode reads it.
                s.tables = Some(unsafe { self.stream.alloc::<u8>(need) }.map_err(cuda)?);
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
            // Eight threads per stream, up to 32 streams of a part at a time; predicted parts
            // keep a byte of state per channel and stream in shared memory, within the
            // default 48 KiB.
            let widest = r.parts.iter().map(|p| p.stream_count).max().unwrap_or(1);
            let mut per_round = widest.clamp(4, 32).next_multiple_of(4);
            let predicted = r.parts.iter().any(|p| p.rho_start != NOT_PREDICTED);
            let state_bytes = |streams: u32| {
                if predicted {
                    (streams + 1) * (channels + 4)
                } else {
                    0
                }
            };
            while per_round > 4 && state_bytes(per_round) > SHARED_STATE_BYTES {
                per_round -= 4;
            }
            if state_bytes(per_round) > SHARED_STATE_BYTES {
                return Err(KernelError::Layout(format!(
                    "{channels} channels are too wide for predicted parts on this decoder"
                )));
            }
            let threads = 8 * per_round;
            let (streams, parts, steps, biases, escapes, rho) =
                (base + rs, base + rp, base + rst, base + rb, base + re, base + rh);
            let mut b = self.stream.launch_builder(&self.k.rans[dtype as usize]);
            b.arg(&input)
                .arg(&streams)
                .arg(&parts)
                .arg(&tables)
                .arg(&freqs)
                .arg(&steps)
                .arg(&biases)
                .arg(&escapes)
                .arg(&rho)
                .arg(&slots_p)
                .arg(&table_p)
                .arg(&bsz)
                .arg(&channels)
                .arg(&err);
            // SAFETY: as above; every index the kernel follows was checked by the planner.
            let cfg = LaunchConfig {
                shared_mem_bytes: state_bytes(per_round),
                ..config(n_parts, threads)
            };
            unsafe { b.launch(cfg) }.map_err(cuda)?;
            if !r.exact_rows.is_empty() {
                // After rans_decode on the same stream: the exact rows overwrite its output.
                let n_rows = u32::try_from(r.exact_rows.len())
                    .map_err(|_| KernelError::Layout("too many exact rows".into()))?;
                let rows = base + ex;
                let mut b = self.stream.launch_builder(&self.k.exact_rows);
                b.arg(&input)
                    .arg(&rows)
                    .arg(&n_rows)
                    .arg(&slots_p)
                    .arg(&table_p)
                    .arg(&bsz)
                    .arg(&channels)
                    .arg(&dt);
                // SAFETY: arguments match the kernel's signature; rows were checked by the
                // planner to lie inside the input and the plan's tokens.
                unsafe { b.launch(config(n_rows, 128)) }.map_err(cuda)?;
            }
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
        let end = self.stream.record_event(timed).map_err(cuda)?;
        s.timings.push((start, end));
        Ok(())
    }

    /// GPU time of the kernels of the last completed decode (table builds and decodes,
    /// without copies and planning), in milliseconds.
    pub fn last_kernel_ms(&self) -> Option<f32> {
        self.scratch.lock().unwrap_or_else(|e| e.into_inner()).last_ms
    }

    /// Waits for the decode stream and turns the kernels' error word into a result.
    fn finish(&self, s: &mut Scratch) -> Result<(), KernelError> {
        let err = self.stream.clone_dtoh(&s.err).map_err(cuda)?;
        self.stream.synchronize().map_err(cuda)?;
        s.staging_used = 0;
        let mut ms = 0f32;
        for (a, b) in s.timings.drain(..) {
            ms += a.elapsed_ms(&b).map_err(cuda)?;
        }
        s.last_ms = Some(ms);
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
