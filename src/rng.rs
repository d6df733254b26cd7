//! Random numbers: one counter-based generator (Philox 4x32-10) for everything kiln draws.
//!
//! Philox is what cuRAND and PyTorch's CUDA generator use. Being counter-based, the value at a
//! given (key, counter) is a pure function, so the CPU backend and a GPU kernel produce the same
//! dropout mask for the same seed and step without sharing any state; the CUDA kernels carry a
//! copy of [`philox4x32`] in CUDA C.
//!
//! [`Rng`] is the sequential face of the same function, used for weight initialisation, shuffling
//! and augmentation: `Rng::new(seed)` always yields the same stream.

const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

#[inline]
fn mulhilo(a: u32, b: u32) -> (u32, u32) {
    let p = a as u64 * b as u64;
    ((p >> 32) as u32, p as u32)
}

/// Philox 4x32 with 10 rounds: four 32-bit random words for a 128-bit counter and a 64-bit key.
#[inline]
pub fn philox4x32(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let mut c = counter;
    let mut k = key;
    for round in 0..10 {
        if round > 0 {
            k[0] = k[0].wrapping_add(W0);
            k[1] = k[1].wrapping_add(W1);
        }
        let (hi0, lo0) = mulhilo(M0, c[0]);
        let (hi1, lo1) = mulhilo(M1, c[2]);
        c = [hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0];
    }
    c
}

/// Maps a random word to a float uniform in [0, 1) with 24 bits of resolution (exact in f32).
#[inline]
pub fn u32_to_unit(x: u32) -> f32 {
    (x >> 8) as f32 * (1.0 / 16_777_216.0)
}

/// The four uniforms in [0, 1) that the dropout kernels use for elements `4*block .. 4*block+4`
/// at execution number `step` of a layer whose key is `seed`.
#[inline]
pub fn dropout_uniforms(seed: u64, step: u64, block: u64) -> [f32; 4] {
    let r = philox4x32(
        [block as u32, (block >> 32) as u32, step as u32, (step >> 32) as u32],
        [seed as u32, (seed >> 32) as u32],
    );
    [u32_to_unit(r[0]), u32_to_unit(r[1]), u32_to_unit(r[2]), u32_to_unit(r[3])]
}

/// A mixing function for deriving independent seeds from one (`SplitMix64`'s finaliser).
pub fn mix_seed(seed: u64, salt: u64) -> u64 {
    let mut z = seed ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A seeded sequential generator (Philox in counter mode). Cloning it forks the stream exactly,
/// and its whole state is `(seed, position)`, so it can be saved and restored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rng {
    key: [u32; 2],
    counter: u64,
    buf: [u32; 4],
    used: usize,
}

/// What a generator's state is saved as: its seed and how many words it has handed out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RngState {
    /// The seed the generator started from.
    pub seed: u64,
    /// How many 64-bit words it has produced since.
    pub words: u64,
}

impl Rng {
    /// A generator whose stream depends only on `seed`.
    pub fn new(seed: u64) -> Self {
        Rng { key: [seed as u32, (seed >> 32) as u32], counter: 0, buf: [0; 4], used: 4 }
    }

    /// The generator's state: restoring it with [`Rng::from_state`] continues the same stream.
    pub fn state(&self) -> RngState {
        let seed = self.key[0] as u64 | ((self.key[1] as u64) << 32);
        let words = if self.used == 4 { self.counter * 4 } else { (self.counter - 1) * 4 + self.used as u64 };
        RngState { seed, words }
    }

    /// A generator positioned where the one that produced `state` was.
    pub fn from_state(state: RngState) -> Self {
        let mut r = Rng::new(state.seed);
        r.counter = state.words / 4;
        let rem = (state.words % 4) as usize;
        if rem > 0 {
            r.refill();
            r.used = rem;
        }
        r
    }

    fn refill(&mut self) {
        let c = self.counter;
        self.buf = philox4x32([c as u32, (c >> 32) as u32, 0, 0], self.key);
        self.counter += 1;
        self.used = 0;
    }

    /// The next 32 random bits.
    pub fn next_u32(&mut self) -> u32 {
        if self.used == 4 {
            self.refill();
        }
        let v = self.buf[self.used];
        self.used += 1;
        v
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        (self.next_u32() as u64) << 32 | self.next_u32() as u64
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f32 {
        u32_to_unit(self.next_u32())
    }

    /// Uniform in [lo, hi).
    pub fn uniform_range(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.uniform()
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f32 {
        let u1 = (self.next_u32() as f64 + 1.0) / 4_294_967_297.0;
        let u2 = self.next_u32() as f64 / 4_294_967_296.0;
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }

    /// Uniform integer in [0, n), without modulo bias. `n` must be positive.
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "Rng::below(0)");
        let zone = u64::MAX - (u64::MAX % n);
        loop {
            let v = self.next_u64();
            if v < zone {
                return v % n;
            }
        }
    }

    /// Shuffles a slice in place (Fisher-Yates).
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn philox_known_answer() {
        // Known-answer vectors from the Random123 distribution (kat_vectors, philox4x32_10).
        assert_eq!(philox4x32([0, 0, 0, 0], [0, 0]), [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]);
        assert_eq!(philox4x32([0xffffffff; 4], [0xffffffff; 2]), [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]);
        assert_eq!(
            philox4x32([0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344], [0xa4093822, 0x299f31d0]),
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
        );
    }

    #[test]
    fn state_round_trip_continues_the_stream() {
        for skip in 0..9 {
            let mut a = Rng::new(7);
            for _ in 0..skip {
                a.next_u32();
            }
            let mut b = Rng::from_state(a.state());
            for _ in 0..10 {
                assert_eq!(a.next_u32(), b.next_u32());
            }
        }
    }

    #[test]
    fn below_and_uniform_stay_in_range() {
        let mut r = Rng::new(1);
        for n in 1..50u64 {
            assert!(r.below(n) < n);
        }
        let mean: f32 = (0..10_000).map(|_| r.uniform()).sum::<f32>() / 10_000.0;
        assert!((mean - 0.5).abs() < 0.02, "{mean}");
    }
}
