//! Reading metrics: the Prometheus text of a process's `/metrics`, and the
//! registry of a consumer embedded in the test.

use prometheus::Registry;

/// The value of `series` (a metric name with its labels as printed,
/// `name{kind="x"}`, or a bare name) in Prometheus text, if it is there.
pub fn series_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// The value of the first series whose line starts with `prefix` (a name,
/// whatever its labels: `kgs_producer_keys_in_pool` matches
/// `kgs_producer_keys_in_pool{pool="p"} 7`), if there is one.
pub fn first_value(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

/// A counter's or gauge's value in `registry`, summed over its series
/// (`label` = `(name, value)` picks the series carrying it); 0 if absent.
pub fn registry_value(registry: &Registry, name: &str, label: Option<(&str, &str)>) -> f64 {
    registry
        .gather()
        .iter()
        .filter(|f| f.name() == name)
        .flat_map(|f| f.get_metric())
        .filter(|m| {
            label.is_none_or(|(k, v)| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == k && l.value() == v)
            })
        })
        // Only one of the two is set; the other reads 0.
        .map(|m| m.get_counter().get_value() + m.get_gauge().get_value())
        .sum()
}
