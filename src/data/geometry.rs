//! Geometric transforms: centre and random crops (with constant padding), bilinear resize and
//! small rotations. Each type's docs give its exact convention; they follow PyTorch and
//! torchvision wherever a user would compare.

use super::sample::Image;
use super::transforms::Transform;
use crate::rng::Rng;
use crate::{Error, Result};

/// The `h x w` window whose top-left corner is at (`top`, `left`) in `image` (either may be
/// negative or run past the edge); pixels outside the image are `fill`.
pub(crate) fn crop_padded(image: &Image, top: isize, left: isize, h: usize, w: usize, fill: f32) -> Image {
    let (ih, iw) = (image.height() as isize, image.width() as isize);
    let mut out = vec![fill; image.channels() * h * w];
    // Columns of the window that fall inside the image.
    let x0 = left.clamp(0, iw);
    let x1 = (left + w as isize).clamp(0, iw);
    for c in 0..image.channels() {
        let src = image.plane(c);
        let dst = &mut out[c * h * w..(c + 1) * h * w];
        for y in 0..h {
            let sy = top + y as isize;
            if sy < 0 || sy >= ih || x0 >= x1 {
                continue;
            }
            let s = (sy * iw) as usize;
            let d = y * w + (x0 - left) as usize;
            dst[d..d + (x1 - x0) as usize].copy_from_slice(&src[s + x0 as usize..s + x1 as usize]);
        }
    }
    Image::new(image.channels(), h, w, out).expect("window of C*h*w values")
}

fn check_size(what: &str, h: usize, w: usize) -> Result<()> {
    if h == 0 || w == 0 {
        return Err(Error::config(format!("{what} size"), format!("must be positive, got {h}x{w}")));
    }
    Ok(())
}

/// The centre `h x w` window, at torchvision's offsets; an image smaller than the window is padded
/// with zeros around it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CenterCrop {
    h: usize,
    w: usize,
}

impl CenterCrop {
    /// A crop of `h` x `w` pixels from the centre.
    pub fn new(h: usize, w: usize) -> Self {
        CenterCrop { h, w }
    }
}

/// The offset of a centred window of `crop` in `size`, torchvision's way: pad `(crop - size) / 2`
/// (rounded down) before if the window is larger, else `round((size - crop) / 2)`, half to even.
fn centre_offset(size: usize, crop: usize) -> isize {
    if crop > size { -(((crop - size) / 2) as isize) } else { ((size - crop) as f64 / 2.0).round_ties_even() as isize }
}

impl Transform for CenterCrop {
    fn apply(&self, image: Image, _: &mut Rng) -> Result<Image> {
        check_size("CenterCrop", self.h, self.w)?;
        let top = centre_offset(image.height(), self.h);
        let left = centre_offset(image.width(), self.w);
        Ok(crop_padded(&image, top, left, self.h, self.w, 0.0))
    }
}

/// A random `h x w` window after padding every side with `padding` pixels of `fill` (default 0):
/// torchvision's `RandomCrop(size, padding=p)`. Draws the row offset, then the column offset.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RandomCrop {
    h: usize,
    w: usize,
    padding: usize,
    fill: f32,
}

impl RandomCrop {
    /// A crop of `h` x `w` pixels at a random position, without padding (see [`RandomCrop::padding`]).
    pub fn new(h: usize, w: usize) -> Self {
        RandomCrop { h, w, padding: 0, fill: 0.0 }
    }

    /// Pixels of padding added on each of the four sides before cropping.
    pub fn padding(mut self, padding: usize) -> Self {
        self.padding = padding;
        self
    }

    /// The value of the padding pixels.
    pub fn fill(mut self, fill: f32) -> Self {
        self.fill = fill;
        self
    }
}

impl Transform for RandomCrop {
    fn apply(&self, image: Image, rng: &mut Rng) -> Result<Image> {
        check_size("RandomCrop", self.h, self.w)?;
        let p = self.padding;
        let (ph, pw) = (image.height() + 2 * p, image.width() + 2 * p);
        if ph < self.h || pw < self.w {
            return Err(Error::shape(
                "RandomCrop",
                format!("an image of at least {}x{} after padding {p} on each side", self.h, self.w),
                format!("{} ({ph}x{pw} padded)", image.dims()),
            ));
        }
        let top = rng.below((ph - self.h + 1) as u64) as isize - p as isize;
        let left = rng.below((pw - self.w + 1) as u64) as isize - p as isize;
        Ok(crop_padded(&image, top, left, self.h, self.w, self.fill))
    }
}

/// How [`Resize`] treats an image whose aspect ratio differs from the target's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ResizeMode {
    /// Scale each axis independently to the target size (the aspect ratio may change).
    #[default]
    Stretch,
    /// Scale both axes by one factor so the image covers the target, then take the centre window:
    /// nothing is distorted, the overflow along one axis is cut off.
    KeepAspectCrop,
}

/// Bilinear resize to `h x w`, as PyTorch's
/// `F.interpolate(mode="bilinear", align_corners=False, antialias=False)`: output pixel `d`
/// samples input coordinate `(d + 0.5) * in / out - 0.5`, clamped at 0, and the last row/column
/// repeats at the far edge. No antialiasing: shrinking by more than 2x aliases.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resize {
    h: usize,
    w: usize,
    mode: ResizeMode,
}

impl Resize {
    /// Stretches to `h x w`; [`Resize::mode`] picks [`ResizeMode::KeepAspectCrop`] instead.
    pub fn new(h: usize, w: usize) -> Self {
        Resize { h, w, mode: ResizeMode::Stretch }
    }

    /// How the aspect ratio is treated (default [`ResizeMode::Stretch`]).
    pub fn mode(mut self, mode: ResizeMode) -> Self {
        self.mode = mode;
        self
    }
}

/// For each output position along one axis: the two input positions and the second's weight.
fn linear_taps(input: usize, output: usize) -> Vec<(usize, usize, f32)> {
    let scale = input as f32 / output as f32;
    (0..output)
        .map(|d| {
            let src = ((d as f32 + 0.5) * scale - 0.5).max(0.0);
            let i0 = (src as usize).min(input - 1);
            let i1 = (i0 + 1).min(input - 1);
            (i0, i1, src - i0 as f32)
        })
        .collect()
}

/// Bilinear resize (align_corners = False, no antialiasing). `image` must not be empty.
fn resize_bilinear(image: &Image, h: usize, w: usize) -> Image {
    if image.height() == h && image.width() == w {
        return image.clone();
    }
    let ys = linear_taps(image.height(), h);
    let xs = linear_taps(image.width(), w);
    let iw = image.width();
    let mut out = Vec::with_capacity(image.channels() * h * w);
    for c in 0..image.channels() {
        let src = image.plane(c);
        for &(y0, y1, ly) in &ys {
            let (r0, r1) = (&src[y0 * iw..(y0 + 1) * iw], &src[y1 * iw..(y1 + 1) * iw]);
            for &(x0, x1, lx) in &xs {
                let top = (1.0 - lx) * r0[x0] + lx * r0[x1];
                let bottom = (1.0 - lx) * r1[x0] + lx * r1[x1];
                out.push((1.0 - ly) * top + ly * bottom);
            }
        }
    }
    Image::new(image.channels(), h, w, out).expect("C*h*w values")
}

impl Transform for Resize {
    fn apply(&self, image: Image, _: &mut Rng) -> Result<Image> {
        check_size("Resize", self.h, self.w)?;
        let (ih, iw) = (image.height(), image.width());
        if ih == 0 || iw == 0 {
            return Err(Error::shape("Resize", "a non-empty image", image.dims()));
        }
        match self.mode {
            ResizeMode::Stretch => Ok(resize_bilinear(&image, self.h, self.w)),
            ResizeMode::KeepAspectCrop => {
                let s = (self.h as f64 / ih as f64).max(self.w as f64 / iw as f64);
                let rh = ((ih as f64 * s).round() as usize).max(self.h);
                let rw = ((iw as f64 * s).round() as usize).max(self.w);
                let resized = resize_bilinear(&image, rh, rw);
                let top = centre_offset(rh, self.h);
                let left = centre_offset(rw, self.w);
                Ok(crop_padded(&resized, top, left, self.h, self.w, 0.0))
            }
        }
    }
}

/// `image` turned by `degrees` counter-clockwise about its centre `((w - 1) / 2, (h - 1) / 2)`,
/// same size, sampled bilinearly; a neighbour outside the image counts as `fill` (PyTorch's
/// `grid_sample` with zero padding when `fill` is 0).
pub fn rotate(image: &Image, degrees: f32, fill: f32) -> Image {
    let (h, w) = (image.height(), image.width());
    let (sin, cos) = (degrees as f64).to_radians().sin_cos();
    let (sin, cos) = (sin as f32, cos as f32);
    let (cx, cy) = ((w as f32 - 1.0) * 0.5, (h as f32 - 1.0) * 0.5);
    let at = |plane: &[f32], x: isize, y: isize| -> f32 {
        if x < 0 || y < 0 || x >= w as isize || y >= h as isize { fill } else { plane[y as usize * w + x as usize] }
    };
    let mut out = Vec::with_capacity(image.channels() * h * w);
    for c in 0..image.channels() {
        let plane = image.plane(c);
        for y in 0..h {
            let dy = y as f32 - cy;
            for x in 0..w {
                let dx = x as f32 - cx;
                // Inverse map: the source point that lands on (x, y).
                let sx = cos * dx - sin * dy + cx;
                let sy = sin * dx + cos * dy + cy;
                let (fx, fy) = (sx.floor(), sy.floor());
                let (lx, ly) = (sx - fx, sy - fy);
                let (x0, y0) = (fx as isize, fy as isize);
                let top = (1.0 - lx) * at(plane, x0, y0) + lx * at(plane, x0 + 1, y0);
                let bottom = (1.0 - lx) * at(plane, x0, y0 + 1) + lx * at(plane, x0 + 1, y0 + 1);
                out.push((1.0 - ly) * top + ly * bottom);
            }
        }
    }
    Image::new(image.channels(), h, w, out).expect("same size as the input")
}

/// A rotation by an angle drawn uniformly from `[-degrees, degrees]` (torchvision's
/// `RandomRotation(degrees)`, bilinear, fill 0 unless set).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RandomRotation {
    degrees: f32,
    fill: f32,
}

impl RandomRotation {
    /// Errors unless `degrees` is finite and non-negative.
    pub fn new(degrees: f32) -> Result<Self> {
        if !(degrees.is_finite() && degrees >= 0.0) {
            return Err(Error::config(
                "RandomRotation degrees",
                format!("must be finite and non-negative, got {degrees}"),
            ));
        }
        Ok(RandomRotation { degrees, fill: 0.0 })
    }

    /// The value where the turned image does not cover the output.
    pub fn fill(mut self, fill: f32) -> Self {
        self.fill = fill;
        self
    }
}

impl Transform for RandomRotation {
    fn apply(&self, image: Image, rng: &mut Rng) -> Result<Image> {
        let angle = rng.uniform_range(-self.degrees, self.degrees);
        Ok(rotate(&image, angle, self.fill))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn centre_offsets_round_half_to_even() {
        // torchvision: int(round((size - crop) / 2.0)), Python rounding half to even.
        assert_eq!(centre_offset(5, 2), 2); // 1.5 -> 2
        assert_eq!(centre_offset(3, 2), 0); // 0.5 -> 0
        assert_eq!(centre_offset(7, 2), 2); // 2.5 -> 2
        assert_eq!(centre_offset(4, 2), 1);
        assert_eq!(centre_offset(2, 5), -1); // pad (5-2)//2 = 1 before
    }

    #[test]
    fn crop_padded_fills_outside() {
        let img = Image::new(1, 2, 2, vec![1.0, 2.0, 3.0, 4.0]).unwrap();
        let out = crop_padded(&img, -1, 1, 3, 2, 9.0);
        assert_eq!(out.data(), &[9.0, 9.0, 2.0, 9.0, 4.0, 9.0]);
        let far = crop_padded(&img, 5, 5, 1, 1, 7.0);
        assert_eq!(far.data(), &[7.0]);
    }

    #[test]
    fn linear_taps_match_pytorch() {
        // torch.nn.functional.interpolate(x, size=2, mode="linear", align_corners=False) on 4
        // values samples input coordinates 0.5 and 2.5.
        assert_eq!(linear_taps(4, 2), vec![(0, 1, 0.5), (2, 3, 0.5)]);
        // Upsampling clamps at 0 on the left and repeats the last value on the right.
        let t = linear_taps(2, 4);
        assert_eq!(t[0], (0, 1, 0.0));
        assert_eq!(t[3], (1, 1, 0.25));
    }

    #[test]
    fn zero_sizes_are_errors() {
        let mut rng = Rng::new(0);
        assert!(CenterCrop::new(0, 2).apply(Image::zeros(1, 2, 2), &mut rng).is_err());
        assert!(Resize::new(2, 0).apply(Image::zeros(1, 2, 2), &mut rng).is_err());
        assert!(Resize::new(2, 2).apply(Image::zeros(1, 0, 2), &mut rng).is_err());
        assert!(RandomRotation::new(-1.0).is_err());
    }
}
