//! GCRA (the generic cell rate algorithm): a smooth rate limit kept as one number per key, the
//! theoretical arrival time (TAT). [`decide`] is the in-process version; [`SCRIPT`] is the same
//! arithmetic in Lua, run atomically inside Redis for every limit of a request at once.
//!
//! With emission interval `T` (period / count) and burst `B`, a request at `now` is admitted
//! when `now >= max(TAT, now) + T - B·T`; admitting it moves TAT forward by `T`. So `B` requests
//! may arrive at once, then one every `T`.

/// One limit to check for a request. Times are in microseconds, so rates up to a million a
/// second are exact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GcraRequest {
    pub key: String,
    /// Emission interval `T`, in microseconds (at least 1).
    pub interval_us: u64,
    /// Burst `B` (at least 1).
    pub burst: u32,
}

/// The answer for one limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GcraOutcome {
    pub allowed: bool,
    /// Requests still admissible right now after this one.
    pub remaining: u32,
    /// Microseconds until the limit is fully replenished.
    pub reset_us: u64,
    /// For a refusal: microseconds until a request would be admitted.
    pub retry_after_us: u64,
}

/// Decides one limit given its stored TAT; returns the outcome and the TAT to store if the
/// request is admitted.
pub fn decide(stored_tat: Option<u64>, now: u64, req: &GcraRequest) -> (GcraOutcome, Option<u64>) {
    let interval = req.interval_us.max(1);
    let capacity = interval * u64::from(req.burst.max(1));
    let tat = stored_tat.unwrap_or(now).max(now);
    let new_tat = tat + interval;
    // Admitted iff new_tat - now <= capacity.
    if new_tat - now <= capacity {
        let remaining = (capacity - (new_tat - now)) / interval;
        (
            GcraOutcome {
                allowed: true,
                remaining: u32::try_from(remaining).unwrap_or(u32::MAX),
                reset_us: new_tat - now,
                retry_after_us: 0,
            },
            Some(new_tat),
        )
    } else {
        (
            GcraOutcome {
                allowed: false,
                remaining: 0,
                reset_us: tat - now,
                retry_after_us: new_tat - now - capacity,
            },
            None,
        )
    }
}

/// KEYS: one per limit. ARGV: `1` to count the request or `0` to only look, then per limit the
/// interval in µs and the burst. Uses Redis's own clock, so every gateway instance agrees on
/// time. Admits all limits or none: a request refused by one limit consumes nothing from the
/// others. Returns, per limit, `allowed, remaining, reset_us, retry_after_us`. (Microsecond
/// timestamps, about 1.8e15, are exact in Lua's doubles.)
pub const SCRIPT: &str = r#"
local consume = ARGV[1] == '1'
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local out = {}
local new_tats = {}
local all = true
for i, key in ipairs(KEYS) do
  local interval = tonumber(ARGV[2 * i])
  local capacity = interval * tonumber(ARGV[2 * i + 1])
  local tat = tonumber(redis.call('GET', key)) or now
  if tat < now then tat = now end
  local new_tat = tat + interval
  local n = #out
  if new_tat - now <= capacity then
    new_tats[i] = new_tat
    out[n + 1] = 1
    out[n + 2] = math.floor((capacity - (new_tat - now)) / interval)
    out[n + 3] = new_tat - now
    out[n + 4] = 0
  else
    all = false
    out[n + 1] = 0
    out[n + 2] = 0
    out[n + 3] = tat - now
    out[n + 4] = new_tat - now - capacity
  end
end
if all and consume then
  for i, key in ipairs(KEYS) do
    redis.call('SET', key, new_tats[i], 'PX', math.max(1, math.ceil((new_tats[i] - now) / 1000)))
  end
end
return out
"#;

/// KEYS: one limit's key. ARGV: its interval in µs. Gives back the unit a request took, for a
/// request that another limit refused (on Redis Cluster, where limits are counted one by one).
pub const REFUND_SCRIPT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('GET', KEYS[1]))
if tat then
  local back = tat - tonumber(ARGV[1])
  if back > now then
    redis.call('SET', KEYS[1], back, 'PX', math.max(1, math.ceil((back - now) / 1000)))
  else
    redis.call('DEL', KEYS[1])
  end
end
return 1
"#;

#[cfg(test)]
mod tests {
    use super::*;

    fn req(interval_us: u64, burst: u32) -> GcraRequest {
        GcraRequest {
            key: "k".into(),
            interval_us,
            burst,
        }
    }

    #[test]
    fn burst_then_one_per_interval() {
        let r = req(1000, 3);
        let mut tat = None;
        let mut now = 10_000;
        let mut remaining = Vec::new();
        for _ in 0..3 {
            let (outcome, new_tat) = decide(tat, now, &r);
            assert!(outcome.allowed);
            remaining.push(outcome.remaining);
            tat = new_tat;
        }
        assert_eq!(remaining, [2, 1, 0]);
        let (refused, none) = decide(tat, now, &r);
        assert!(!refused.allowed && none.is_none());
        assert_eq!(refused.retry_after_us, 1000);
        assert_eq!(refused.reset_us, 3000);
        now += 1000;
        assert!(
            decide(tat, now, &r).0.allowed,
            "one interval later, one more"
        );
    }
}
