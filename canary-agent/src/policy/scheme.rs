//! Scheme policy files: a sequence of `(define-... '(...))` forms holding
//! quoted association lists, read with lexpr's located datums so every error
//! carries the line of the offending form or entry.
//!
//! Beyond the seed's forms this reads `define-stages` and custom metric
//! queries (also accepted: `on-fail` per metric, "5m" strings for seconds):
//!
//! ```scheme
//! (define-stages
//!   '((internal-testing (weights 0 0))
//!     (beta-users (weights 1 5)
//!                 (gate (approval . #t) (webhook . "http://...") (timeout . 30)))))
//! (define-canary-metrics
//!   '((conversion-rate (threshold . 0.9) (window . 600) (on-fail . pause-and-alert)
//!                      (events . "...{version}...") (trials . "...{version}..."))))
//! (define-analysis '((error-floor . 0.01) (max-hold . 1800)))  ; or "30m"; 0 = never
//! (define-rollback '((connections . drain) (waves . all)))    ; or keep; waves: all | wave
//! (define-verification '((duration . 300)))    ; seconds at 100 % before retiring
//! (define-retirement '((connections . drain) (timeout . 600))) ; drain | keep | close-after
//! (define-waves '(("eu-1") ("us-1" "us-2" (gate (approval . #t))))) ; regions in order
//! ```
//!
//! The stage that reaches 100 % may carry the last two instead:
//! `(full-deployment (weights 50 100) (verification (duration . 300)) (retirement ...))`.

use std::cell::Cell;

use lexpr::datum::Ref;
use lexpr::Value;

use super::routing::{
    self, Assignment, Cohort, FlagRule, HeaderRule, Membership, Target, UserKey, Version,
};
use super::{
    check_error_floor, percent_float_to_bp, percent_int_to_bp, Action, AnalysisSettings, Cmp,
    CustomQuery, Draft, Gate, MetricName, MetricSpec, OnRollback, Policy, PolicyError,
    PolicyErrorKind, Retire, RetireConnections, RollbackRule, Site, Sourced, Stage, Step, Wave,
    WaveRollback, WeightBp, FULL_BP,
};

const FORMS: [&str; 15] = [
    "define-canary-split",
    "define-progression",
    "define-stages",
    "define-canary-metrics",
    "define-rollback-rules",
    "define-analysis",
    "define-rollback",
    "define-verification",
    "define-retirement",
    "define-waves",
    "define-header-routing",
    "define-cohorts",
    "define-user-key",
    "define-user-cohorts",
    "define-feature-routing",
];

/// Parses a Scheme policy; `origin` names the file in errors.
pub fn parse_scheme(text: &str, origin: &str) -> Result<Policy, PolicyError> {
    let reader = Reader {
        origin,
        line: Cell::new(1),
    };
    let mut draft = Draft::new(origin);
    let mut seen: Vec<String> = Vec::new();
    let mut parser = lexpr::Parser::from_str(text);
    loop {
        let datum = match parser.next_datum() {
            Ok(Some(datum)) => datum,
            Ok(None) => break,
            Err(e) => {
                return Err(PolicyError {
                    kind: PolicyErrorKind::Invalid,
                    origin: origin.to_string(),
                    line: e.location().map(|l| l.line()),
                    context: "s-expression".into(),
                    reason: e.to_string(),
                })
            }
        };
        reader.form(datum.as_ref(), &mut draft, &mut seen)?;
    }
    draft.finish()
}

struct Reader<'o> {
    origin: &'o str,
    /// Line of the innermost form or entry being read: the line of data whose datum
    /// has no position of its own (lexpr gives none to the tail after a dot).
    line: Cell<usize>,
}

/// `((key . value) ...)` entries, taken by name; leftovers are errors.
struct Props<'a> {
    entries: Vec<(String, Ref<'a>, Ref<'a>)>,
}

impl<'a> Props<'a> {
    fn take(&mut self, key: &str) -> Option<Ref<'a>> {
        let at = self.entries.iter().position(|(k, _, _)| k == key)?;
        Some(self.entries.remove(at).1)
    }
}

/// A datum as written, cut short for messages (a stray datum may be a whole file).
fn brief(r: Ref<'_>) -> String {
    const MAX: usize = 60;
    let text = r.value().to_string();
    if text.chars().count() <= MAX {
        return text;
    }
    let mut short: String = text.chars().take(MAX - 1).collect();
    short.push('…');
    short
}

/// 1-based line of a datum; 0 when lexpr does not know it.
fn line(r: Ref<'_>) -> usize {
    r.span().start().line()
}

impl Reader<'_> {
    fn err(&self, at: Ref<'_>, context: &str, reason: impl Into<String>) -> PolicyError {
        PolicyError {
            kind: PolicyErrorKind::Invalid,
            origin: self.origin.to_string(),
            line: Some(self.line_of(at)),
            context: context.to_string(),
            reason: reason.into(),
        }
    }

    /// The datum's line, or the enclosing entry's when it has none.
    fn line_of(&self, at: Ref<'_>) -> usize {
        match line(at) {
            0 => self.line.get(),
            known => known,
        }
    }

    /// Notes that `at` is now being read, for [`Reader::line_of`].
    fn enter(&self, at: Ref<'_>) {
        if line(at) > 0 {
            self.line.set(line(at));
        }
    }

    fn site(&self, at: Ref<'_>, context: String) -> Site {
        Site {
            line: Some(self.line_of(at)),
            context,
        }
    }

    fn form(
        &self,
        form: Ref<'_>,
        draft: &mut Draft,
        seen: &mut Vec<String>,
    ) -> Result<(), PolicyError> {
        let shape = "expected a (define-... '(...)) form";
        self.enter(form);
        let items = self.list(form, "top level")?;
        let Some(name) = items.first().and_then(|h| h.as_symbol()) else {
            return Err(self.err(form, "top level", shape));
        };
        if !FORMS.contains(&name) {
            return Err(self.err(
                form,
                name,
                format!("unknown form (known: {})", FORMS.join(", ")),
            ));
        }
        if seen.iter().any(|s| s == name) {
            return Err(self.err(form, name, "given twice"));
        }
        seen.push(name.to_string());
        let quoted = match &items[1..] {
            [arg] => self.list(*arg, name).ok(),
            _ => None,
        };
        let data = match quoted.as_deref() {
            Some([quote, data]) if quote.as_symbol() == Some("quote") => *data,
            _ => return Err(self.err(form, name, format!("{shape}: one quoted list"))),
        };
        match name {
            "define-canary-split" => draft.split = Some(self.split(data)?),
            "define-progression" => draft.steps = self.progression(data)?,
            "define-stages" => self.stages(data, draft)?,
            "define-canary-metrics" => draft.metrics = self.metrics(data)?,
            "define-rollback-rules" => draft.rules = self.rules(data)?,
            "define-analysis" => draft.analysis = self.analysis(data)?,
            "define-rollback" => {
                (draft.on_rollback, draft.wave_rollback) = self.on_rollback(data)?;
            }
            "define-waves" => draft.waves = self.waves(data)?,
            "define-verification" => {
                if draft
                    .verify_s
                    .replace(self.verification(data, name)?)
                    .is_some()
                {
                    return Err(self.err(form, name, "given twice (also in define-stages)"));
                }
            }
            "define-retirement" => {
                if draft.retire.replace(self.retirement(data, name)?).is_some() {
                    return Err(self.err(form, name, "given twice (also in define-stages)"));
                }
            }
            "define-header-routing" => draft.routing.header = Some(self.header_routing(data)?),
            "define-cohorts" => {
                draft.routing.cohorts = self.cohorts(data)?;
                draft.routing_sites.0 = Some(self.site(form, name.into()));
            }
            "define-user-key" => draft.routing.user_key = Some(self.user_key(data)?),
            "define-user-cohorts" => {
                draft.routing.assignments = self.user_cohorts(data)?;
                draft.routing_sites.1 = Some(self.site(form, name.into()));
            }
            _ => draft.routing.flags = Some(self.feature_routing(data)?),
        }
        Ok(())
    }

    fn header_routing(&self, data: Ref<'_>) -> Result<HeaderRule, PolicyError> {
        let ctx = "define-header-routing";
        let mut props = self.props(data, ctx)?;
        let header = self.required(&mut props, data, ctx, "header")?;
        let header = self.name(header, ctx, "header")?;
        let values = self.required(&mut props, data, ctx, "values")?;
        let values = self.strings(values, ctx)?;
        let values = routing::check_values(ctx, values).map_err(|r| self.err(data, ctx, r))?;
        let default = props
            .take("default")
            .map(|v| self.version(v, ctx))
            .transpose()?;
        self.done(props, ctx)?;
        Ok(HeaderRule {
            header,
            values,
            default,
        })
    }

    fn cohorts(&self, data: Ref<'_>) -> Result<Vec<Cohort>, PolicyError> {
        let mut cohorts = Vec::new();
        for entry in self.list(data, "define-cohorts")? {
            let (name, rest) = self.named(entry, "define-cohorts")?;
            let here = format!("define-cohorts {name}");
            let mut props = self.props(rest, &here)?;
            let member = if let Some(v) = props.take("default") {
                if v.as_bool() != Some(true) {
                    return Err(self.err(v, &here, "default must be #t"));
                }
                Membership::Default
            } else if let Some(v) = props.take("client-cidr") {
                let nets = self.strings(v, &here)?;
                let nets = routing::check_values(&here, nets)
                    .and_then(|n| n.iter().map(|t| routing::parse_cidr(t)).collect())
                    .map_err(|r| self.err(v, &here, r))?;
                Membership::ClientCidr(nets)
            } else if let Some(v) = props.take("cookie") {
                let cookie = self.name(v, &here, "cookie")?;
                let values = self.required(&mut props, entry, &here, "values")?;
                let values = routing::check_values(&here, self.strings(values, &here)?)
                    .map_err(|r| self.err(entry, &here, r))?;
                Membership::Cookie { cookie, values }
            } else if let Some(v) = props.take("header") {
                let header = self.name(v, &here, "header")?;
                if let Some(suffix) = props.take("suffix") {
                    let suffix = self.string(suffix, &here)?;
                    Membership::Suffix { header, suffix }
                } else {
                    let values = self.required(&mut props, entry, &here, "values")?;
                    let values = routing::check_values(&here, self.strings(values, &here)?)
                        .map_err(|r| self.err(entry, &here, r))?;
                    Membership::Header { header, values }
                }
            } else {
                return Err(self.err(
                    entry,
                    &here,
                    "expected (header . NAME) with (values ...) or (suffix . S), \
                     (cookie . NAME) with (values ...), (client-cidr ...) or (default . #t)",
                ));
            };
            self.done(props, &here)?;
            cohorts.push(Cohort { name, member });
        }
        Ok(cohorts)
    }

    /// `'(header . "X-User-Id")`, `'(cookie . "uid")` or `'client-ip`.
    fn user_key(&self, data: Ref<'_>) -> Result<UserKey, PolicyError> {
        let ctx = "define-user-key";
        if data.as_symbol() == Some("client-ip") {
            return Ok(UserKey::ClientIp);
        }
        match data.as_pair() {
            Some((kind, name)) if kind.as_symbol() == Some("header") => {
                Ok(UserKey::Header(self.name(name, ctx, "header")?))
            }
            Some((kind, name)) if kind.as_symbol() == Some("cookie") => {
                Ok(UserKey::Cookie(self.name(name, ctx, "cookie")?))
            }
            _ => Err(self.err(
                data,
                ctx,
                format!(
                    "expected (header . NAME), (cookie . NAME) or client-ip, found {}",
                    brief(data)
                ),
            )),
        }
    }

    fn user_cohorts(&self, data: Ref<'_>) -> Result<Vec<Assignment>, PolicyError> {
        let ctx = "define-user-cohorts";
        let mut out = Vec::new();
        for entry in self.list(data, ctx)? {
            let (cohort, value) = self.named(entry, ctx)?;
            if cohort == "percentage" {
                let here = format!("{ctx} percentage");
                for share in self.list(value, &here)? {
                    let (cohort, pct) = self.named(share, &here)?;
                    let weight = self.weight(pct, &format!("{here} {cohort}"))?;
                    out.push(Assignment {
                        cohort,
                        target: Target::Percent(weight),
                    });
                }
            } else {
                let target = Target::Version(self.version(value, &format!("{ctx} {cohort}"))?);
                out.push(Assignment { cohort, target });
            }
        }
        Ok(out)
    }

    fn feature_routing(&self, data: Ref<'_>) -> Result<FlagRule, PolicyError> {
        let ctx = "define-feature-routing";
        let mut props = self.props(data, ctx)?;
        let header = self.required(&mut props, data, ctx, "header")?;
        let header = self.name(header, ctx, "header")?;
        let flags_at = self.required(&mut props, data, ctx, "flags")?;
        let mut flags = Vec::new();
        for entry in self.list(flags_at, ctx)? {
            let (flag, version) = self.named(entry, ctx)?;
            flags.push((flag, self.version(version, &format!("{ctx} flags"))?));
        }
        let flags = routing::check_flags(flags).map_err(|r| self.err(flags_at, ctx, r))?;
        self.done(props, ctx)?;
        Ok(FlagRule { header, flags })
    }

    fn required<'a>(
        &self,
        props: &mut Props<'a>,
        at: Ref<'_>,
        ctx: &str,
        key: &str,
    ) -> Result<Ref<'a>, PolicyError> {
        props
            .take(key)
            .ok_or_else(|| self.err(at, ctx, format!("missing ({key} . ...)")))
    }

    fn name(&self, r: Ref<'_>, ctx: &str, what: &str) -> Result<String, PolicyError> {
        let text = self.string(r, ctx)?;
        routing::check_name(what, &text).map_err(|reason| self.err(r, ctx, reason))
    }

    fn strings(&self, r: Ref<'_>, ctx: &str) -> Result<Vec<String>, PolicyError> {
        self.list(r, ctx)?
            .into_iter()
            .map(|v| self.string(v, ctx))
            .collect()
    }

    fn version(&self, r: Ref<'_>, ctx: &str) -> Result<Version, PolicyError> {
        let name = r.as_symbol().map_or_else(|| brief(r), str::to_string);
        Version::parse(&name).map_err(|reason| self.err(r, ctx, reason))
    }

    fn analysis(&self, data: Ref<'_>) -> Result<AnalysisSettings, PolicyError> {
        let ctx = "define-analysis";
        let mut props = self.props(data, ctx)?;
        let mut settings = AnalysisSettings::default();
        if let Some(v) = props.take("error-floor") {
            let here = format!("{ctx} error-floor");
            settings.error_floor =
                check_error_floor(self.number(v, &here)?).map_err(|r| self.err(v, &here, r))?;
        }
        if let Some(v) = props.take("max-hold") {
            settings.max_hold_s = self.seconds(v, &format!("{ctx} max-hold"))?;
        }
        self.done(props, ctx)?;
        Ok(settings)
    }

    fn on_rollback(&self, data: Ref<'_>) -> Result<(OnRollback, WaveRollback), PolicyError> {
        let ctx = "define-rollback";
        let mut props = self.props(data, ctx)?;
        let mut on_rollback = OnRollback::default();
        let mut waves = WaveRollback::default();
        let symbol = |v: Ref<'_>| v.as_symbol().map_or_else(|| brief(v), str::to_string);
        if let Some(v) = props.take("connections") {
            on_rollback = OnRollback::parse(&symbol(v))
                .map_err(|r| self.err(v, &format!("{ctx} connections"), r))?;
        }
        if let Some(v) = props.take("waves") {
            waves = WaveRollback::parse(&symbol(v))
                .map_err(|r| self.err(v, &format!("{ctx} waves"), r))?;
        }
        self.done(props, ctx)?;
        Ok((on_rollback, waves))
    }

    /// `(("eu-1") ("us-1" "us-2" (gate ...)))`: each wave its region strings, then an
    /// optional gate as a stage's.
    fn waves(&self, data: Ref<'_>) -> Result<Vec<Sourced<Wave>>, PolicyError> {
        let mut waves = Vec::new();
        for (i, entry) in self.list(data, "define-waves")?.into_iter().enumerate() {
            let here = format!("define-waves wave {}", i + 1);
            let mut regions = Vec::new();
            let mut gate = None;
            for item in self.list(entry, &here)? {
                if item.as_pair().is_some() {
                    let (key, rest) = self.named(item, &here)?;
                    if key != "gate" || gate.is_some() {
                        return Err(self.err(
                            item,
                            &here,
                            "expected region strings and one (gate ...)",
                        ));
                    }
                    gate = Some(self.gate(rest, &format!("{here} gate"))?);
                } else {
                    regions.push(self.string(item, &here)?);
                }
            }
            waves.push(Sourced {
                item: Wave { regions, gate },
                site: self.site(entry, here),
            });
        }
        Ok(waves)
    }

    /// `((duration . SECONDS))`.
    fn verification(&self, data: Ref<'_>, ctx: &str) -> Result<u64, PolicyError> {
        let mut props = self.props(data, ctx)?;
        let duration = props
            .take("duration")
            .ok_or_else(|| self.err(data, ctx, "missing (duration . SECONDS)"))?;
        let duration_s = self.seconds(duration, &format!("{ctx} duration"))?;
        self.done(props, ctx)?;
        Ok(duration_s)
    }

    /// `((connections . drain|keep|close-after) (timeout . SECONDS))`, both optional.
    fn retirement(&self, data: Ref<'_>, ctx: &str) -> Result<Retire, PolicyError> {
        let mut props = self.props(data, ctx)?;
        let mut retire = Retire::default();
        if let Some(v) = props.take("connections") {
            let name = v.as_symbol().map_or_else(|| brief(v), str::to_string);
            retire.connections = RetireConnections::parse(&name)
                .map_err(|r| self.err(v, &format!("{ctx} connections"), r))?;
        }
        if let Some(v) = props.take("timeout") {
            retire.timeout_s = self.seconds(v, &format!("{ctx} timeout"))?;
        }
        self.done(props, ctx)?;
        Ok(retire)
    }

    fn split(&self, data: Ref<'_>) -> Result<WeightBp, PolicyError> {
        let ctx = "define-canary-split";
        let mut props = self.props(data, ctx)?;
        let canary = props
            .take("canary")
            .ok_or_else(|| self.err(data, ctx, "missing (canary . PERCENT)"))?;
        let canary = self.weight(canary, &format!("{ctx} canary"))?;
        if let Some(stable) = props.take("stable") {
            if self.weight(stable, &format!("{ctx} stable"))? != FULL_BP - canary {
                return Err(self.err(stable, ctx, "canary and stable must add up to 100 %"));
            }
        }
        self.done(props, ctx)?;
        Ok(canary)
    }

    fn progression(&self, data: Ref<'_>) -> Result<Vec<Sourced<Step>>, PolicyError> {
        let ctx = "define-progression";
        let mut steps = Vec::new();
        for entry in self.list(data, ctx)? {
            self.enter(entry);
            let here = format!("{ctx} {}", brief(entry));
            let (at, weight) = entry
                .as_pair()
                .ok_or_else(|| self.err(entry, &here, "expected (SECONDS . PERCENT)"))?;
            steps.push(Sourced {
                item: Step {
                    at_s: self.seconds(at, &here)?,
                    weight_bp: self.weight(weight, &here)?,
                },
                site: self.site(entry, here),
            });
        }
        Ok(steps)
    }

    /// The stages, and the verification and retirement the stage that reaches 100 %
    /// may carry (as `define-verification` and `define-retirement` do).
    fn stages(&self, data: Ref<'_>, draft: &mut Draft) -> Result<(), PolicyError> {
        let mut stages = Vec::new();
        for entry in self.list(data, "define-stages")? {
            let (name, rest) = self.named(entry, "define-stages")?;
            let here = format!("define-stages {name}");
            let mut props = self.props(rest, &here)?;
            let weights = props
                .take("weights")
                .ok_or_else(|| self.err(entry, &here, "missing (weights MIN MAX)"))?;
            let bounds = match self.list(weights, &here)?[..] {
                [min, max] => [self.weight(min, &here)?, self.weight(max, &here)?],
                _ => return Err(self.err(weights, &here, "expected (weights MIN MAX)")),
            };
            let gate = props
                .take("gate")
                .map(|g| self.gate(g, &format!("{here} gate")))
                .transpose()?;
            let finishing = [
                props.take("verification").map(|v| ("verification", v)),
                props.take("retirement").map(|v| ("retirement", v)),
            ];
            for (key, value) in finishing.into_iter().flatten() {
                let ctx = format!("{here} {key}");
                if bounds[1] != FULL_BP {
                    return Err(self.err(
                        value,
                        &ctx,
                        "only the stage that reaches 100 % may carry it",
                    ));
                }
                let twice = || self.err(value, &ctx, format!("given twice (also define-{key})"));
                if key == "verification" {
                    let duration_s = self.verification(value, &ctx)?;
                    if draft.verify_s.replace(duration_s).is_some() {
                        return Err(twice());
                    }
                } else if draft
                    .retire
                    .replace(self.retirement(value, &ctx)?)
                    .is_some()
                {
                    return Err(twice());
                }
            }
            self.done(props, &here)?;
            stages.push(Sourced {
                item: Stage {
                    name,
                    min_bp: bounds[0],
                    max_bp: bounds[1],
                    gate,
                },
                site: self.site(entry, here),
            });
        }
        draft.stages = Some(stages);
        Ok(())
    }

    fn gate(&self, data: Ref<'_>, ctx: &str) -> Result<Gate, PolicyError> {
        let mut props = self.props(data, ctx)?;
        let approval = match props.take("approval") {
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.err(v, ctx, "approval must be #t or #f"))?,
            None => false,
        };
        let webhook = props
            .take("webhook")
            .map(|v| self.string(v, ctx))
            .transpose()?;
        let timeout_s = props
            .take("timeout")
            .map(|v| self.seconds(v, ctx))
            .transpose()?
            .unwrap_or(0);
        self.done(props, ctx)?;
        if !approval && webhook.is_none() {
            return Err(self.err(data, ctx, "gate needs (approval . #t) or a webhook"));
        }
        Ok(Gate {
            approval,
            webhook,
            timeout_s,
        })
    }

    fn metrics(&self, data: Ref<'_>) -> Result<Vec<Sourced<MetricSpec>>, PolicyError> {
        let mut metrics = Vec::new();
        for entry in self.list(data, "define-canary-metrics")? {
            let (name, rest) = self.named(entry, "define-canary-metrics")?;
            let here = format!("define-canary-metrics {name}");
            let mut props = self.props(rest, &here)?;
            let mut required = |key: &str| {
                props
                    .take(key)
                    .ok_or_else(|| self.err(entry, &here, format!("missing ({key} . ...)")))
            };
            let threshold = self.number(required("threshold")?, &here)?;
            let window_s = self.seconds(required("window")?, &here)?;
            let on_fail = props
                .take("on-fail")
                .map(|v| self.action(v, &here))
                .transpose()?
                .unwrap_or(Action::ImmediateRollback);
            let events = props.take("events").map(|v| self.string(v, &here));
            let trials = props.take("trials").map(|v| self.string(v, &here));
            let query = match (events.transpose()?, trials.transpose()?) {
                (Some(events), Some(trials)) => Some(CustomQuery { events, trials }),
                (None, None) => None,
                _ => return Err(self.err(entry, &here, "give both events and trials, or neither")),
            };
            self.done(props, &here)?;
            metrics.push(Sourced {
                item: MetricSpec {
                    name: MetricName::parse(&name),
                    threshold,
                    window_s,
                    on_fail,
                    query,
                },
                site: self.site(entry, here),
            });
        }
        Ok(metrics)
    }

    fn rules(&self, data: Ref<'_>) -> Result<Vec<Sourced<RollbackRule>>, PolicyError> {
        let mut rules = Vec::new();
        for entry in self.list(data, "define-rollback-rules")? {
            let (name, rest) = self.named(entry, "define-rollback-rules")?;
            let here = format!("define-rollback-rules {name}");
            let mut props = self.props(rest, &here)?;
            let condition = props
                .take("condition")
                .ok_or_else(|| self.err(entry, &here, "missing (condition . EXPR)"))?;
            let (metric, cmp, factor) = self.condition(condition, &format!("{here} condition"))?;
            let action = props
                .take("action")
                .ok_or_else(|| self.err(entry, &here, "missing (action . ACTION)"))?;
            let action = self.action(action, &here)?;
            self.done(props, &here)?;
            rules.push(Sourced {
                item: RollbackRule {
                    name,
                    metric,
                    cmp,
                    factor,
                    action,
                },
                site: self.site(entry, here),
            });
        }
        Ok(rules)
    }

    /// `(> error-rate (* baseline 1.5))`; the factor may also come first.
    fn condition(&self, expr: Ref<'_>, ctx: &str) -> Result<(MetricName, Cmp, f64), PolicyError> {
        let bad = || {
            self.err(
                expr,
                ctx,
                "expected (> METRIC (* baseline FACTOR)) or with <",
            )
        };
        let items = self.list(expr, ctx)?;
        let [op, metric, product] = items[..] else {
            return Err(bad());
        };
        let cmp = op.as_symbol().and_then(Cmp::parse).ok_or_else(bad)?;
        let metric = metric.as_symbol().ok_or_else(bad)?;
        let factor = match self.list(product, ctx).as_deref() {
            Ok([times, a, b]) if times.as_symbol() == Some("*") => {
                match (a.as_symbol(), b.as_symbol()) {
                    (Some("baseline"), None) => self.number(*b, ctx)?,
                    (None, Some("baseline")) => self.number(*a, ctx)?,
                    _ => return Err(bad()),
                }
            }
            _ => return Err(bad()),
        };
        Ok((MetricName::parse(metric), cmp, factor))
    }

    fn list<'a>(&self, r: Ref<'a>, ctx: &str) -> Result<Vec<Ref<'a>>, PolicyError> {
        let not_list = || self.err(r, ctx, format!("expected a list, found {}", brief(r)));
        let mut iter = r.list_iter().ok_or_else(not_list)?;
        let items: Vec<Ref<'a>> = iter.by_ref().collect();
        if !iter.is_empty() {
            return Err(not_list());
        }
        Ok(items)
    }

    /// `(name ...)` with a symbol head; returns the name and the tail.
    fn named<'a>(&self, entry: Ref<'a>, ctx: &str) -> Result<(String, Ref<'a>), PolicyError> {
        self.enter(entry);
        match entry.as_pair() {
            Some((name, rest)) if name.is_symbol() => {
                Ok((name.as_symbol().unwrap_or_default().to_string(), rest))
            }
            _ => Err(self.err(
                entry,
                ctx,
                format!("expected (NAME ...), found {}", brief(entry)),
            )),
        }
    }

    fn props<'a>(&self, r: Ref<'a>, ctx: &str) -> Result<Props<'a>, PolicyError> {
        let mut entries: Vec<(String, Ref<'a>, Ref<'a>)> = Vec::new();
        for entry in self.list(r, ctx)? {
            let (key, value) = self.named(entry, ctx)?;
            if entries.iter().any(|(k, _, _)| *k == key) {
                return Err(self.err(entry, ctx, format!("`{key}` given twice")));
            }
            entries.push((key, value, entry));
        }
        Ok(Props { entries })
    }

    fn done(&self, props: Props<'_>, ctx: &str) -> Result<(), PolicyError> {
        match props.entries.first() {
            Some((key, _, entry)) => Err(self.err(*entry, ctx, format!("unknown key `{key}`"))),
            None => Ok(()),
        }
    }

    fn weight(&self, r: Ref<'_>, ctx: &str) -> Result<WeightBp, PolicyError> {
        let converted = match r.value() {
            Value::Number(n) => match n.as_i64() {
                Some(i) => percent_int_to_bp(i),
                None => percent_float_to_bp(n.as_f64().unwrap_or(f64::NAN)),
            },
            _ => Err(format!("expected a percentage, found {}", brief(r))),
        };
        converted.map_err(|reason| self.err(r, ctx, reason))
    }

    fn seconds(&self, r: Ref<'_>, ctx: &str) -> Result<u64, PolicyError> {
        let converted = match r.value() {
            Value::Number(n) => n
                .as_u64()
                .ok_or_else(|| format!("duration {n} must be whole seconds, not negative")),
            Value::String(s) => super::parse_duration(s),
            _ => Err(format!(
                "expected seconds or a \"5m\" string, found {}",
                brief(r)
            )),
        };
        converted.map_err(|reason| self.err(r, ctx, reason))
    }

    fn number(&self, r: Ref<'_>, ctx: &str) -> Result<f64, PolicyError> {
        r.as_f64()
            .ok_or_else(|| self.err(r, ctx, format!("expected a number, found {}", brief(r))))
    }

    fn string(&self, r: Ref<'_>, ctx: &str) -> Result<String, PolicyError> {
        r.as_str()
            .map(str::to_string)
            .ok_or_else(|| self.err(r, ctx, format!("expected a string, found {}", brief(r))))
    }

    fn action(&self, r: Ref<'_>, ctx: &str) -> Result<Action, PolicyError> {
        let name = r.as_symbol().map_or_else(|| brief(r), str::to_string);
        Action::parse(&name).map_err(|reason| self.err(r, ctx, reason))
    }
}
