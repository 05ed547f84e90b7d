//! Units shared by every layer: canary weights in basis points and their percent
//! forms (parsed exactly, printed without rounding), and the time and number formats
//! that people read. A leaf: it imports nothing of the crate.

use canary_common::WEIGHT_SCALE;

/// Canary weight in basis points: 1 bp = 0.01 %, 10_000 = 100 %.
pub type WeightBp = u16;

/// 100 % in basis points.
pub const FULL_BP: WeightBp = WEIGHT_SCALE;

/// Converts a percentage with at most two decimals (0.01 % steps) to basis points.
pub fn percent_to_bp(percent: f64) -> Result<u16, String> {
    if !percent.is_finite() || !(0.0..=100.0).contains(&percent) {
        return Err(format!("{percent} is not a percentage between 0 and 100"));
    }
    let bp = (percent * 100.0).round();
    if (percent * 100.0 - bp).abs() > 1e-6 {
        return Err(format!(
            "{percent} has more than two decimals (weights move in 0.01 % steps)"
        ));
    }
    Ok(bp as u16)
}

/// Formats basis points as a percentage, e.g. 1250 -> "12.5".
pub fn bp_to_percent(bp: WeightBp) -> f64 {
    bp as f64 / (WEIGHT_SCALE as f64 / 100.0)
}

/// "12.5%", "0.01%", "100%": exact, no trailing zeros.
pub fn percent(bp: WeightBp) -> String {
    let (whole, frac) = (bp / 100, bp % 100);
    match frac {
        0 => format!("{whole}%"),
        f if f % 10 == 0 => format!("{whole}.{}%", f / 10),
        f => format!("{whole}.{f:02}%"),
    }
}

/// Whole or decimal percent text ("5", "0.01", "12.5") to exact basis points.
pub(crate) fn percent_text_to_bp(text: &str) -> Result<WeightBp, String> {
    let (int, frac) = text.split_once('.').unwrap_or((text, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if int.is_empty() || !digits(int) || !digits(frac) {
        return Err(format!("weight `{text}` is not a percentage from 0 to 100"));
    }
    let frac = frac.trim_end_matches('0');
    if frac.len() > 2 {
        return Err(format!(
            "weight {text} % has more than two decimals (the finest step is 0.01 %)"
        ));
    }
    let too_big = || format!("weight {text} % is above 100 %");
    let whole: u32 = int.parse().map_err(|_| too_big())?;
    let hundredths: u32 = format!("{frac:0<2}").parse().unwrap_or(0);
    let bp = whole
        .checked_mul(100)
        .and_then(|b| b.checked_add(hundredths))
        .filter(|&b| b <= u32::from(FULL_BP))
        .ok_or_else(too_big)?;
    Ok(bp as WeightBp)
}

pub(crate) fn percent_int_to_bp(value: i64) -> Result<WeightBp, String> {
    percent_text_to_bp(&value.to_string())
}

/// Uses the shortest round-trip decimal of the float, so `12.34` is exact
/// and `12.345` is rejected rather than rounded.
pub(crate) fn percent_float_to_bp(value: f64) -> Result<WeightBp, String> {
    if !value.is_finite() {
        return Err(format!("weight {value} is not a percentage from 0 to 100"));
    }
    percent_text_to_bp(&value.to_string())
}

/// UTC time of day with milliseconds.
pub fn format_ms(ms: u64) -> String {
    let s = ms / 1000;
    format!(
        "{:02}:{:02}:{:02}.{:03}Z",
        (s / 3600) % 24,
        (s / 60) % 60,
        s % 60,
        ms % 1000
    )
}

/// A verdict number for people: four significant digits, `-` when there is none.
pub fn round(v: &serde_json::Value) -> String {
    match v.as_f64() {
        None => "-".into(),
        Some(x) if x == 0.0 || !x.is_finite() => format!("{x}"),
        Some(x) => {
            let digits = (3 - x.abs().log10().floor() as i32).clamp(0, 6) as usize;
            format!("{x:.digits$}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_conversion_is_exact() {
        assert_eq!(percent_to_bp(0.01), Ok(1));
        assert_eq!(percent_to_bp(33.33), Ok(3333));
        assert_eq!(percent_to_bp(100.0), Ok(10_000));
        assert!(percent_to_bp(-1.0).is_err());
        assert!(percent_to_bp(f64::NAN).is_err());
        assert!(percent_to_bp(0.005).is_err());
        assert_eq!(bp_to_percent(1250), 12.5);
    }

    #[test]
    fn percent_is_exact_or_rejected() {
        assert_eq!(percent_text_to_bp("5"), Ok(500));
        assert_eq!(percent_text_to_bp("0.01"), Ok(1));
        assert_eq!(percent_text_to_bp("12.50"), Ok(1250));
        assert_eq!(percent_text_to_bp("100"), Ok(10_000));
        assert_eq!(percent_float_to_bp(12.34), Ok(1234));
        assert_eq!(percent_float_to_bp(0.1), Ok(10));
        assert!(percent_float_to_bp(12.345)
            .unwrap_err()
            .contains("two decimals"));
        assert!(percent_int_to_bp(101).unwrap_err().contains("above 100"));
        assert!(percent_int_to_bp(-1).is_err());
        assert!(percent_text_to_bp("1e3").is_err());
        assert!(percent_text_to_bp("99999999999").is_err());
    }
}
