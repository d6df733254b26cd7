//! The [`Transform`] trait, [`Compose`], and the per-pixel transforms: scaling to [0, 1],
//! normalisation and its inverse, flips, colour jitter, grey <-> RGB. Geometric transforms that
//! resample (crops, resize, rotation) are in `geometry.rs`.
//!
//! A transform takes an image by value and returns it (in place where it can), drawing any
//! randomness from the generator it is handed. The loader hands each sample its own generator,
//! [`sample_rng`], so augmentation is reproducible whatever the number of workers.

use super::sample::Image;
use crate::rng::{Rng, mix_seed};
use crate::{Error, Result};

/// A step of a preprocessing or augmentation pipeline.
///
/// `Send + Sync` because the loader's workers share one pipeline. A transform that does not fit
/// its input (wrong channel count, a crop larger than the image) returns an error; the loader adds
/// the sample index and path.
pub trait Transform: Send + Sync {
    /// Transforms one image, drawing randomness (if any) from `rng`.
    fn apply(&self, image: Image, rng: &mut Rng) -> Result<Image>;
}

impl<T: Transform + ?Sized> Transform for Box<T> {
    fn apply(&self, image: Image, rng: &mut Rng) -> Result<Image> {
        (**self).apply(image, rng)
    }
}

impl<T: Transform + ?Sized> Transform for std::sync::Arc<T> {
    fn apply(&self, image: Image, rng: &mut Rng) -> Result<Image> {
        (**self).apply(image, rng)
    }
}

/// Salt that separates augmentation streams from the shuffling and split streams of one seed.
const AUGMENT_SALT: u64 = 0x4155_4755_4d45_4e54;

/// The generator the loader hands to the transforms of sample `index` in `epoch`: a pure function
/// of the three, so any sample's augmentation can be reproduced on its own.
pub fn sample_rng(seed: u64, epoch: u64, index: usize) -> Rng {
    Rng::new(mix_seed(mix_seed(mix_seed(seed, AUGMENT_SALT), epoch), index as u64))
}

/// Transforms applied one after the other.
///
/// ```
/// use kiln::data::{Compose, Normalize, RandomCrop, RandomHorizontalFlip, ToFloat};
/// # fn main() -> kiln::Result<()> {
/// let cifar_train = Compose::new()
///     .then(RandomCrop::new(32, 32).padding(4))
///     .then(RandomHorizontalFlip::new(0.5))
///     .then(ToFloat)
///     .then(Normalize::new(&[0.4914, 0.4822, 0.4465], &[0.2470, 0.2435, 0.2616])?);
/// assert_eq!(cifar_train.len(), 4);
/// # Ok(())
/// # }
/// ```
#[derive(Default)]
pub struct Compose {
    steps: Vec<Box<dyn Transform>>,
}

impl Compose {
    /// An empty pipeline (the identity).
    pub fn new() -> Self {
        Compose::default()
    }

    /// This pipeline followed by `t`.
    pub fn then(mut self, t: impl Transform + 'static) -> Self {
        self.steps.push(Box::new(t));
        self
    }

    /// Number of transforms in the chain.
    pub fn len(&self) -> usize {
        self.steps.len()
    }

    /// Whether the chain is empty (it then passes images through).
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }
}

impl Transform for Compose {
    fn apply(&self, image: Image, rng: &mut Rng) -> Result<Image> {
        self.steps.iter().try_fold(image, |img, t| t.apply(img, rng))
    }
}

/// A transform from a closure, for one-off steps (torchvision's `Lambda`).
pub struct Lambda<F>(pub F);

impl<F> Transform for Lambda<F>
where
    F: Fn(Image, &mut Rng) -> Result<Image> + Send + Sync,
{
    fn apply(&self, image: Image, rng: &mut Rng) -> Result<Image> {
        (self.0)(image, rng)
    }
}

/// Scales byte-valued pixels (0..=255) to [0, 1] by dividing by 255, as torchvision's `ToTensor`.
#[derive(Clone, Copy, Debug, Default)]
pub struct ToFloat;

impl Transform for ToFloat {
    fn apply(&self, mut image: Image, _: &mut Rng) -> Result<Image> {
        for v in image.data_mut() {
            *v /= 255.0;
        }
        Ok(image)
    }
}

/// Per-channel `(x - mean) / std`. One mean and std per channel, or one of each for all channels.
#[derive(Clone, Debug, PartialEq)]
pub struct Normalize {
    mean: Vec<f32>,
    std: Vec<f32>,
}

/// Per-channel `x * std + mean`: undoes a [`Normalize`] with the same values (to look at images).
#[derive(Clone, Debug, PartialEq)]
pub struct Denormalize {
    mean: Vec<f32>,
    std: Vec<f32>,
}

fn check_mean_std(what: &str, mean: &[f32], std: &[f32]) -> Result<()> {
    if mean.is_empty() || mean.len() != std.len() {
        return Err(Error::config(
            format!("{what} mean/std"),
            format!("need as many stds as means, at least one: got {} means, {} stds", mean.len(), std.len()),
        ));
    }
    if let Some(s) = std.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
        return Err(Error::config(format!("{what} std"), format!("must be positive and finite, got {s}")));
    }
    if let Some(m) = mean.iter().find(|m| !m.is_finite()) {
        return Err(Error::config(format!("{what} mean"), format!("must be finite, got {m}")));
    }
    Ok(())
}

/// Applies `f(value, mean, std)` to each channel, broadcasting a single mean/std.
fn per_channel(
    what: &str,
    mut image: Image,
    mean: &[f32],
    std: &[f32],
    f: impl Fn(f32, f32, f32) -> f32,
) -> Result<Image> {
    let c = image.channels();
    if mean.len() != 1 && mean.len() != c {
        return Err(Error::shape(what, format!("an image of {} channels (one per mean)", mean.len()), image.dims()));
    }
    let plane = image.height() * image.width();
    for (ch, values) in image.data_mut().chunks_mut(plane.max(1)).enumerate() {
        let k = if mean.len() == 1 { 0 } else { ch };
        let (m, s) = (mean[k], std[k]);
        for v in values {
            *v = f(*v, m, s);
        }
    }
    Ok(image)
}

impl Normalize {
    /// Errors if the lengths differ or a std is not positive.
    pub fn new(mean: &[f32], std: &[f32]) -> Result<Self> {
        check_mean_std("Normalize", mean, std)?;
        Ok(Normalize { mean: mean.to_vec(), std: std.to_vec() })
    }

    /// The transform that undoes this one.
    pub fn inverse(&self) -> Denormalize {
        Denormalize { mean: self.mean.clone(), std: self.std.clone() }
    }
}

impl Transform for Normalize {
    fn apply(&self, image: Image, _: &mut Rng) -> Result<Image> {
        per_channel("Normalize", image, &self.mean, &self.std, |x, m, s| (x - m) / s)
    }
}

impl Denormalize {
    /// Errors if the lengths differ or a std is not positive.
    pub fn new(mean: &[f32], std: &[f32]) -> Result<Self> {
        check_mean_std("Denormalize", mean, std)?;
        Ok(Denormalize { mean: mean.to_vec(), std: std.to_vec() })
    }
}

impl Transform for Denormalize {
    fn apply(&self, image: Image, _: &mut Rng) -> Result<Image> {
        per_channel("Denormalize", image, &self.mean, &self.std, |x, m, s| x * s + m)
    }
}

/// Mirrors the image left to right, always.
#[derive(Clone, Copy, Debug, Default)]
pub struct HorizontalFlip;

pub(crate) fn flip_in_place(image: &mut Image) {
    let w = image.width();
    if w > 1 {
        for row in image.data_mut().chunks_exact_mut(w) {
            row.reverse();
        }
    }
}

impl Transform for HorizontalFlip {
    fn apply(&self, mut image: Image, _: &mut Rng) -> Result<Image> {
        flip_in_place(&mut image);
        Ok(image)
    }
}

/// Mirrors the image left to right with probability `p` (p <= 0: never, p >= 1: always). Draws
/// one uniform per image whatever `p` is.
#[derive(Clone, Copy, Debug)]
pub struct RandomHorizontalFlip {
    p: f32,
}

impl RandomHorizontalFlip {
    /// Flips left-right with probability `p`.
    pub fn new(p: f32) -> Self {
        RandomHorizontalFlip { p }
    }
}

impl Transform for RandomHorizontalFlip {
    fn apply(&self, mut image: Image, rng: &mut Rng) -> Result<Image> {
        if rng.uniform() < self.p {
            flip_in_place(&mut image);
        }
        Ok(image)
    }
}

/// The luma weights torchvision's `rgb_to_grayscale` uses (ITU-R 601-2, as PIL's `convert("L")`).
const LUMA: [f32; 3] = [0.2989, 0.587, 0.114];

/// A one-channel image of `LUMA`-weighted sums of an RGB image's channels.
pub(crate) fn grey_from_rgb(image: &Image) -> Image {
    let (r, g, b) = (image.plane(0), image.plane(1), image.plane(2));
    let data = r.iter().zip(g).zip(b).map(|((&r, &g), &b)| LUMA[0] * r + LUMA[1] * g + LUMA[2] * b).collect();
    Image::new(1, image.height(), image.width(), data).expect("one plane of the RGB image's size")
}

fn check_grey_or_rgb(what: &str, image: &Image) -> Result<()> {
    match image.channels() {
        1 | 3 => Ok(()),
        _ => Err(Error::shape(what, "an image of 1 (grey) or 3 (RGB) channels", image.dims())),
    }
}

/// RGB to one grey channel (0.2989 R + 0.587 G + 0.114 B, torchvision's `Grayscale(1)`); a
/// one-channel image passes unchanged.
#[doc(alias = "Grayscale")]
#[derive(Clone, Copy, Debug, Default)]
pub struct ToGrey;

impl Transform for ToGrey {
    fn apply(&self, image: Image, _: &mut Rng) -> Result<Image> {
        check_grey_or_rgb("ToGrey", &image)?;
        Ok(if image.channels() == 3 { grey_from_rgb(&image) } else { image })
    }
}

/// One grey channel to RGB by copying it into all three; a three-channel image passes unchanged.
#[derive(Clone, Copy, Debug, Default)]
pub struct ToRgb;

impl Transform for ToRgb {
    fn apply(&self, image: Image, _: &mut Rng) -> Result<Image> {
        check_grey_or_rgb("ToRgb", &image)?;
        if image.channels() == 3 {
            return Ok(image);
        }
        let (h, w) = (image.height(), image.width());
        let plane = image.into_data();
        let mut data = Vec::with_capacity(3 * plane.len());
        for _ in 0..3 {
            data.extend_from_slice(&plane);
        }
        Image::new(3, h, w, data)
    }
}

/// Random brightness, contrast and saturation changes with torchvision's `ColorJitter` semantics,
/// for images in [0, 1] (after [`ToFloat`]); results are clamped to [0, 1].
///
/// Each enabled adjustment draws a factor uniformly from its range, and the adjustments run in a
/// random order:
/// - brightness: `x * f`;
/// - contrast: blend with the mean of the grey image, `f * x + (1 - f) * mean`;
/// - saturation: blend with the grey image, `f * x + (1 - f) * grey` (a grey image is unchanged).
///
/// Hue jitter is not implemented.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ColorJitter {
    brightness: Option<(f32, f32)>,
    contrast: Option<(f32, f32)>,
    saturation: Option<(f32, f32)>,
}

impl ColorJitter {
    /// Factors drawn from `[max(0, 1 - v), 1 + v]` for each value `v`; 0 disables that adjustment.
    /// Errors on a negative or non-finite value.
    pub fn new(brightness: f32, contrast: f32, saturation: f32) -> Result<Self> {
        let range = |name: &str, v: f32| -> Result<Option<(f32, f32)>> {
            if !(v.is_finite() && v >= 0.0) {
                return Err(Error::config(
                    format!("ColorJitter {name}"),
                    format!("must be finite and non-negative, got {v}"),
                ));
            }
            Ok((v > 0.0).then_some(((1.0 - v).max(0.0), 1.0 + v)))
        };
        Ok(ColorJitter {
            brightness: range("brightness", brightness)?,
            contrast: range("contrast", contrast)?,
            saturation: range("saturation", saturation)?,
        })
    }

    /// Factors drawn from explicit `(min, max)` ranges (torchvision's tuple form); a range of
    /// `(1, 1)` still runs that adjustment, with factor 1.
    pub fn ranges(brightness: (f32, f32), contrast: (f32, f32), saturation: (f32, f32)) -> Result<Self> {
        let check = |name: &str, (lo, hi): (f32, f32)| -> Result<Option<(f32, f32)>> {
            if !(lo.is_finite() && hi.is_finite() && 0.0 <= lo && lo <= hi) {
                return Err(Error::config(
                    format!("ColorJitter {name}"),
                    format!("range must satisfy 0 <= min <= max, got ({lo}, {hi})"),
                ));
            }
            Ok(Some((lo, hi)))
        };
        Ok(ColorJitter {
            brightness: check("brightness", brightness)?,
            contrast: check("contrast", contrast)?,
            saturation: check("saturation", saturation)?,
        })
    }
}

fn blend_clamped(values: &mut [f32], f: f32, other: impl Fn(usize) -> f32) {
    let g = 1.0 - f;
    for (i, v) in values.iter_mut().enumerate() {
        *v = (f * *v + g * other(i)).clamp(0.0, 1.0);
    }
}

/// `x * factor`, clamped to [0, 1].
pub fn adjust_brightness(image: &mut Image, factor: f32) {
    for v in image.data_mut() {
        *v = (*v * factor).clamp(0.0, 1.0);
    }
}

/// Blends with the mean grey level: `factor * x + (1 - factor) * mean`, clamped to [0, 1].
pub fn adjust_contrast(image: &mut Image, factor: f32) {
    let grey;
    let plane = if image.channels() == 3 {
        grey = grey_from_rgb(image);
        grey.data()
    } else {
        image.data()
    };
    let mean = plane.iter().map(|&v| v as f64).sum::<f64>() / plane.len().max(1) as f64;
    let mean = mean as f32;
    blend_clamped(image.data_mut(), factor, |_| mean);
}

/// Blends with the grey image: `factor * x + (1 - factor) * grey`, clamped to [0, 1]. A
/// one-channel image is left unchanged, as torchvision and PIL do.
pub fn adjust_saturation(image: &mut Image, factor: f32) {
    if image.channels() != 3 {
        return;
    }
    let grey = grey_from_rgb(image);
    let plane = grey.data().len();
    blend_clamped(image.data_mut(), factor, |i| grey.data()[i % plane.max(1)]);
}

impl Transform for ColorJitter {
    fn apply(&self, mut image: Image, rng: &mut Rng) -> Result<Image> {
        check_grey_or_rgb("ColorJitter", &image)?;
        let mut order = [0usize, 1, 2];
        rng.shuffle(&mut order);
        let mut draw = |r: Option<(f32, f32)>| r.map(|(lo, hi)| rng.uniform_range(lo, hi));
        let factors = [draw(self.brightness), draw(self.contrast), draw(self.saturation)];
        for op in order {
            match (op, factors[op]) {
                (0, Some(f)) => adjust_brightness(&mut image, f),
                (1, Some(f)) => adjust_contrast(&mut image, f),
                (2, Some(f)) => adjust_saturation(&mut image, f),
                _ => {}
            }
        }
        Ok(image)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn img(c: usize, h: usize, w: usize, f: impl Fn(usize) -> f32) -> Image {
        Image::new(c, h, w, (0..c * h * w).map(f).collect()).unwrap()
    }

    #[test]
    fn to_float_divides_by_255() {
        let out = ToFloat.apply(img(1, 1, 3, |i| [0.0, 51.0, 255.0][i]), &mut Rng::new(0)).unwrap();
        assert_eq!(out.data(), &[0.0, 0.2, 1.0]);
    }

    #[test]
    fn normalize_checks_its_config_and_the_channels() {
        assert!(Normalize::new(&[0.5], &[0.0]).is_err());
        assert!(Normalize::new(&[0.5, 0.5], &[0.2]).is_err());
        assert!(Normalize::new(&[], &[]).is_err());
        assert!(Normalize::new(&[f32::NAN], &[1.0]).is_err());
        let n = Normalize::new(&[0.5, 0.5], &[0.5, 0.5]).unwrap();
        let err = n.apply(Image::zeros(3, 2, 2), &mut Rng::new(0)).unwrap_err();
        assert!(err.to_string().contains("3x2x2"), "{err}");
        // One mean/std broadcasts over every channel.
        let one = Normalize::new(&[1.0], &[2.0]).unwrap();
        let out = one.apply(img(2, 1, 1, |i| i as f32 * 5.0), &mut Rng::new(0)).unwrap();
        assert_eq!(out.data(), &[-0.5, 2.0]);
    }

    #[test]
    fn grey_and_rgb_conversions() {
        let rgb = img(3, 1, 2, |i| [1.0, 0.0, 0.0, 1.0, 0.0, 0.0][i]);
        let grey = ToGrey.apply(rgb, &mut Rng::new(0)).unwrap();
        assert_eq!(grey.shape(), [1, 1, 2]);
        assert_eq!(grey.data(), &[0.2989, 0.587]);
        let back = ToRgb.apply(grey.clone(), &mut Rng::new(0)).unwrap();
        assert_eq!(back.data(), &[0.2989, 0.587, 0.2989, 0.587, 0.2989, 0.587]);
        assert_eq!(ToGrey.apply(grey.clone(), &mut Rng::new(0)).unwrap(), grey);
        assert!(ToRgb.apply(Image::zeros(2, 1, 1), &mut Rng::new(0)).is_err());
    }

    #[test]
    fn jitter_adjustments_match_their_formulas() {
        let base = img(3, 1, 2, |i| [0.2, 0.8, 0.4, 0.4, 0.6, 0.0][i]);
        let mut b = base.clone();
        adjust_brightness(&mut b, 2.0);
        assert_eq!(b.data(), &[0.4, 1.0, 0.8, 0.8, 1.0, 0.0]);

        // Contrast 0: every value becomes the mean grey level.
        let mut c = base.clone();
        adjust_contrast(&mut c, 0.0);
        let g0 = 0.2989 * 0.2 + 0.587 * 0.4 + 0.114 * 0.6;
        let g1 = 0.2989 * 0.8 + 0.587 * 0.4 + 0.114 * 0.0;
        let mean = (g0 + g1) / 2.0;
        for v in c.data() {
            assert!((v - mean).abs() < 1e-6, "{v} vs {mean}");
        }

        // Saturation 0: every channel becomes the grey image.
        let mut s = base.clone();
        adjust_saturation(&mut s, 0.0);
        for ch in 0..3 {
            assert!((s.pixel(ch, 0, 0) - g0).abs() < 1e-6);
            assert!((s.pixel(ch, 0, 1) - g1).abs() < 1e-6);
        }
        let mut grey = img(1, 1, 2, |i| i as f32 * 0.5);
        adjust_saturation(&mut grey, 0.0);
        assert_eq!(grey.data(), &[0.0, 0.5]);

        assert!(ColorJitter::new(-0.1, 0.0, 0.0).is_err());
        assert!(ColorJitter::ranges((1.2, 1.0), (1.0, 1.0), (1.0, 1.0)).is_err());
    }

    #[test]
    fn jitter_draws_factors_in_range() {
        let j = ColorJitter::new(0.5, 0.0, 0.0).unwrap();
        let base = img(1, 1, 1, |_| 0.4);
        let mut seen = (f32::MAX, f32::MIN);
        for s in 0..200 {
            let out = j.apply(base.clone(), &mut Rng::new(s)).unwrap();
            let f = out.data()[0] / 0.4;
            seen = (seen.0.min(f), seen.1.max(f));
        }
        assert!(seen.0 >= 0.5 - 1e-6 && seen.1 <= 1.5 + 1e-6, "{seen:?}");
        assert!(seen.0 < 0.6 && seen.1 > 1.4, "{seen:?}");
    }

    #[test]
    fn sample_rng_depends_on_each_input() {
        let first = |s, e, i| sample_rng(s, e, i).next_u64();
        let a = first(1, 2, 3);
        assert_eq!(a, first(1, 2, 3));
        assert_ne!(a, first(0, 2, 3));
        assert_ne!(a, first(1, 3, 3));
        assert_ne!(a, first(1, 2, 4));
    }

    #[test]
    fn lambda_and_compose_chain_in_order() {
        let t = Compose::new()
            .then(Lambda(|mut im: Image, _: &mut Rng| {
                im.data_mut()[0] += 1.0;
                Ok(im)
            }))
            .then(Lambda(|mut im: Image, _: &mut Rng| {
                im.data_mut()[0] *= 10.0;
                Ok(im)
            }));
        let out = t.apply(Image::zeros(1, 1, 1), &mut Rng::new(0)).unwrap();
        assert_eq!(out.data(), &[10.0]);
        assert!(Compose::new().is_empty());
    }
}
