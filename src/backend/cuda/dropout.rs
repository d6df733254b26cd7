//! Dropout on the GPU, drawing exactly the CPU's mask.
//!
//! The mask comes from Philox 4x32-10 (`crate::rng::philox4x32`, rewritten here in CUDA C):
//! element `e` of block `b` (elements `4b .. 4b+4`) is kept iff its uniform `u >= rate`, at
//! execution number `step` of the layer, keyed by the layer's seed. The step is read from the
//! layer's counter in device memory and a one-thread kernel increments it after the mask is
//! drawn, so a replayed CUDA graph draws a new mask every step with no host involvement. A
//! replay (`ops::Dropout::replay`, a checkpointed segment recomputed in backward) reads the
//! counter minus one and does not increment it: the forward's mask again.
//!
//! `philox_test` exists for the unit test that compares this Philox with the Rust one.

use super::CudaBackend;
use super::nvrtc::ModuleSrc;
use crate::backend::ops;
use crate::backend::ops::RunOp;
use crate::{Error, Result};

kernels! {
    dropout_forward(x: (const float*), y: (float*), mask: (float*), n: i64, rate: float, scale: float, seed: u64, counter: (const u64*), back: u64);
    dropout_backward(mask: (const float*), dy: (const float*), dx: (float*), n: i64, acc: int);
    counter_increment(counter: (u64*));
    philox_test(cin: (const unsigned*), cout: (unsigned*), n: i64, k0: unsigned, k1: unsigned);
}

pub(super) const MODULE: ModuleSrc = ModuleSrc {
    name: "dropout",
    kernels: KERNELS,
    prototypes,
    source: r#"
// Philox 4x32-10, as crate::rng::philox4x32.
__device__ __forceinline__ uint4 philox4x32(uint4 c, uint2 k) {
    const unsigned M0 = 0xD2511F53u, M1 = 0xCD9E8D57u, W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
    #pragma unroll
    for (int round = 0; round < 10; round++) {
        if (round > 0) { k.x += W0; k.y += W1; }
        unsigned hi0 = __umulhi(M0, c.x), lo0 = M0 * c.x;
        unsigned hi1 = __umulhi(M1, c.z), lo1 = M1 * c.z;
        c = make_uint4(hi1 ^ c.y ^ k.x, lo1, hi0 ^ c.w ^ k.y, lo0);
    }
    return c;
}

// A uniform in [0, 1) with 24 bits (crate::rng::u32_to_unit).
__device__ __forceinline__ float unit_(unsigned x) { return (float)(x >> 8) * (1.0f / 16777216.0f); }

extern "C" __global__ void dropout_forward(const float* x, float* y, float* mask, i64 n, float rate, float scale,
                                           u64 seed, const u64* counter, u64 back) {
    u64 step = *counter - back;
    uint2 key = make_uint2((unsigned)seed, (unsigned)(seed >> 32));
    GRID_LOOP(b, (n + 3) / 4) {
        uint4 r = philox4x32(make_uint4((unsigned)b, (unsigned)((u64)b >> 32), (unsigned)step, (unsigned)(step >> 32)), key);
        unsigned w[4] = {r.x, r.y, r.z, r.w};
        #pragma unroll
        for (int e = 0; e < 4; e++) {
            i64 i = 4 * b + e;
            if (i < n) {
                float m = unit_(w[e]) >= rate ? scale : 0.f;
                mask[i] = m;
                y[i] = x[i] * m;
            }
        }
    }
}

extern "C" __global__ void dropout_backward(const float* mask, const float* dy, float* dx, i64 n, int acc) {
    GRID_LOOP(i, n) store(&dx[i], dy[i] * mask[i], acc);
}

extern "C" __global__ void counter_increment(u64* counter) { *counter += 1; }

// in: n counters (4 words each); out: n results (4 words each); one key for all.
extern "C" __global__ void philox_test(const unsigned* cin, unsigned* cout, i64 n, unsigned k0, unsigned k1) {
    GRID_LOOP(i, n) {
        uint4 r = philox4x32(make_uint4(cin[4 * i], cin[4 * i + 1], cin[4 * i + 2], cin[4 * i + 3]), make_uint2(k0, k1));
        cout[4 * i] = r.x; cout[4 * i + 1] = r.y; cout[4 * i + 2] = r.z; cout[4 * i + 3] = r.w;
    }
}
"#,
};

impl RunOp<ops::Dropout> for CudaBackend {
    fn run_op(&mut self, o: &ops::Dropout) -> Result<()> {
        let ops::Dropout { rate, len, seed, counter, replay, x, y, mask } = *o;
        // The scale exactly as the CPU computes it (in f32).
        let scale = 1.0f32 / (1.0 - rate);
        let ctr = self.mem.counter_ptr(counter.0)?;
        let args = dropout_forward {
            x: self.ptr(x),
            y: self.ptr(y),
            mask: self.ptr(mask),
            n: len,
            rate,
            scale,
            seed,
            counter: ctr,
            back: replay as u64,
        };
        self.launch_elems(len.div_ceil(4), &args)?;
        if replay {
            // The recomputation of a checkpointed segment: the forward's mask, the counter kept.
            return Ok(());
        }
        self.launch_blocks(1, 1, 0, &counter_increment { counter: ctr })
    }
}

impl RunOp<ops::DropoutBackward> for CudaBackend {
    fn run_op(&mut self, o: &ops::DropoutBackward) -> Result<()> {
        let ops::DropoutBackward { len, mask, dy, dx, .. } = *o;
        let args = dropout_backward {
            mask: self.ptr(mask),
            dy: self.ptr(dy),
            dx: self.ptr(dx.buf),
            n: len,
            acc: dx.accumulate as i32,
        };
        self.launch_elems(len, &args)
    }
}

impl CudaBackend {
    /// Runs the device's Philox 4x32-10 on each `(counter, key)` pair; for checking it against
    /// [`crate::rng::philox4x32`]. All pairs must share one key.
    pub fn philox4x32_on_device(&mut self, counters: &[[u32; 4]], key: [u32; 2]) -> Result<Vec<[u32; 4]>> {
        self.gpu.bind()?;
        let n = counters.len();
        if n == 0 {
            return Ok(Vec::new());
        }
        let words: Vec<u32> = counters.iter().flatten().copied().collect();
        let bytes = n * 16;
        let dev_in = self.mem.alloc(&self.gpu, bytes)?;
        let dev_out = match self.mem.alloc(&self.gpu, bytes) {
            Ok(p) => p,
            Err(e) => {
                self.mem.free_now(&self.gpu, dev_in)?;
                return Err(e);
            }
        };
        let run = (|| -> Result<Vec<[u32; 4]>> {
            let raw: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
            self.mem.upload(&self.gpu, dev_in, &raw)?;
            let args = philox_test { cin: dev_in, cout: dev_out, n, k0: key[0], k1: key[1] };
            self.launch_elems(n, &args)?;
            let mut out = vec![0u8; bytes];
            self.mem.download(&self.gpu, dev_out, &mut out)?;
            let w: Vec<u32> = out.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            Ok(w.chunks_exact(4).map(|c| [c[0], c[1], c[2], c[3]]).collect())
        })();
        self.mem.free_now(&self.gpu, dev_in)?;
        self.mem.free_now(&self.gpu, dev_out)?;
        run.map_err(|e| match e {
            Error::DeviceCall { call, status } => Error::DeviceCall { call: format!("philox test: {call}"), status },
            e => e,
        })
    }
}
