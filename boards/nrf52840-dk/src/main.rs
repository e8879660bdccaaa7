//! Classifies a stream of handwritten digits kept in flash (the first 32
//! test images, standing in for a sensor) with the int8 MoE model on the
//! nRF52840's Cortex-M4F, and logs over RTT (defmt) each image's class, its
//! expert and the inference time from TIMER0 at 1 MHz.
#![no_std]
#![no_main]

use defmt_rtt as _;
use micromoe::{Model, include_model, scratch_len};
use nrf52840_hal::{Timer, pac};
use panic_probe as _;

const MODEL: &[u8] = include_model!("../../../models/digits/digits_int8.moe");
/// Images as the host wrote them: a 24-byte header, then 64 f32 pixels each.
const STREAM: &[u8] = include_bytes!("../../vectors/digits_int8.bin");

fn pixel(image: usize, i: usize) -> f32 {
    let at = 24 + 4 * (64 * image + i);
    STREAM.get(at..at + 4).map_or(0.0, |b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

#[cortex_m_rt::entry]
fn main() -> ! {
    let Some(p) = pac::Peripherals::take() else { panic!("peripherals taken twice") };
    // TIMER0 counts microseconds (1 MHz); one shot of the longest period.
    let mut timer = Timer::new(p.TIMER0);
    timer.start(u32::MAX);

    let model = match Model::parse(MODEL) {
        Ok(m) => m,
        Err(e) => panic!("model refused: {}", e),
    };
    let mut scratch = [0u8; scratch_len!(MODEL)];
    for image in 0..32 {
        let mut x = [0.0f32; 64];
        for (i, v) in x.iter_mut().enumerate() {
            *v = pixel(image, i);
        }
        let mut scores = [0.0f32; 10];
        let (mut expert, mut weight) = (0u16, 0.0f32);
        let start = timer.read();
        let result = model.infer_observed(&x, &mut scores, &mut scratch, |step| {
            if let Some(c) = step.selection.first() {
                (expert, weight) = (c.expert, c.weight);
            }
        });
        let micros = timer.read().wrapping_sub(start);
        match result {
            Ok(()) => {
                let class = scores
                    .iter()
                    .enumerate()
                    .fold((0, f32::MIN), |b, (i, &s)| if s > b.1 { (i, s) } else { b })
                    .0;
                defmt::info!(
                    "image {}: class {}, expert {} (weight {}), {} us",
                    image,
                    class,
                    expert,
                    weight,
                    micros
                );
            }
            Err(e) => defmt::error!("image {}: {}", image, e),
        }
    }
    loop {
        cortex_m::asm::wfi();
    }
}
