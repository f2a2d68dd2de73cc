//! The one executor: journals a plan, runs its steps, undoes the done steps in reverse when one
//! fails, records what it changed, and answers its caller.
//!
//! Each plan runs on a worker thread of its own that owns the plan's locks and journal until
//! the plan is over. The caller waits for the outcome, or until a kernel write has been stuck
//! longer than the write time limit; then it is answered `Stalled` while the worker goes on:
//! the locks stay taken and the journal stays until the kernel returns and the plan is finished
//! (or undone), and what it then changed is announced to the listener. Nothing is abandoned
//! half-way, so nothing lands later behind the daemon's back.
//!
//! A plan whose undo fails is kept as unfinished (journal marked "undoing"): the next operation
//! on any of its locks undoes it first, and a restart does.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use passthroughd_proto::{Change, PciAddress, PciFunction};
use tracing::{info, warn};

use crate::engine::Caller;
use crate::engine::locks::LockGuard;
use crate::engine::plan::{LockKey, OnCrash, Plan, Step, Target};
use crate::engine::registry::Registry;
use crate::error::Error;
use crate::kernel::driver::{Drivers, Progress};
use crate::kernel::sysfs::SysfsRoot;
use crate::kernel::sysfs::read_link_name;
use crate::kernel::vfio::Vfio;
use crate::observe::guard::{AddressProvider, HostSnapshot, Severity};
use crate::observe::inventory::Inventory;
use crate::observe::pciids::PciIds;
use crate::store::journal::JournalEntry;

/// At most this many IOMMU groups are bound at once by one plan.
const MAX_BIND_THREADS: usize = 8;
/// How often a waiting caller looks whether the worker is stuck in the kernel.
const POLL: Duration = Duration::from_millis(20);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What a plan changed, for signals.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Announcement {
    /// Functions whose driver changed.
    pub changes: Vec<Change>,
    /// PFs whose VF count changed, with the new count.
    pub vfs: Vec<(PciAddress, u32)>,
}

/// Receives what plans finished after their callers stopped waiting.
pub type Listener = Box<dyn Fn(Announcement) + Send + Sync>;

/// How a plan is run: fresh from a planner (the guards were checked while planning, under the
/// same locks), or from a journal after a crash (check the hard rules again first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Fresh,
    Recover,
}

/// A plan that is running now, for `status` and for stopping the daemon.
#[derive(Debug)]
struct RunningPlan {
    description: String,
    started: Instant,
    progress: Arc<Progress>,
}

/// A plan that could not be fully undone, or whose journal could not be removed: it is dealt
/// with before its locks are used again.
#[derive(Debug)]
struct Unfinished {
    plan: Plan,
    journal: JournalEntry,
    /// Still to undo (false: done or undone; only the journal is left to remove).
    undo: bool,
}

/// What one step did, for its undo.
#[derive(Debug)]
struct Done {
    index: usize,
    change: Option<Change>,
    /// Record steps: whether the registry changed (an undo must not remove a claim that was
    /// there before).
    recorded: bool,
}

/// What becomes of a plan's journal when [`Executor::execute`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum JournalEnd {
    /// The plan is over, done or undone.
    Remove,
    /// Its undo failed: undone before its locks are used again, or at the next start.
    KeepToUndo,
    /// Left exactly as it is, as a daemon killed here would (test failpoints only).
    Abandon,
}

#[derive(Debug, Default)]
struct Delivery {
    result: Option<Result<Vec<Change>, Error>>,
    detached: bool,
}

pub struct Executor {
    drivers: Drivers,
    root: SysfsRoot,
    ids: Arc<PciIds>,
    state_dir: PathBuf,
    registry: Arc<Mutex<Registry>>,
    addresses: Arc<dyn AddressProvider>,
    write_timeout: Duration,
    vf_wait: Duration,
    group_wait: Duration,
    next_id: AtomicU64,
    running: Mutex<Vec<(u64, RunningPlan)>>,
    idle: Condvar,
    unfinished: Mutex<Vec<Unfinished>>,
    listener: Mutex<Option<Listener>>,
    /// Set once the daemon stops: no new plan starts.
    stopping: AtomicBool,
    /// Test failpoint: the daemon "dies" before running step N of its next plan.
    die_before_step: Option<usize>,
    vfio: Arc<dyn Vfio>,
}

impl std::fmt::Debug for Executor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executor")
            .field("state_dir", &self.state_dir)
            .field("write_timeout", &self.write_timeout)
            .finish_non_exhaustive()
    }
}

/// Everything the executor needs.
#[derive(Debug)]
pub struct ExecutorSetup {
    pub drivers: Drivers,
    pub ids: Arc<PciIds>,
    pub state_dir: PathBuf,
    pub registry: Arc<Mutex<Registry>>,
    pub addresses: Arc<dyn AddressProvider>,
    pub write_timeout: Duration,
    pub vf_wait: Duration,
    pub group_wait: Duration,
    /// Test failpoint (see [`crate::engine::EngineOptions::die_before_step`]).
    pub die_before_step: Option<usize>,
    /// For [`Step::Reset`].
    pub vfio: Arc<dyn Vfio>,
}

impl Executor {
    pub fn new(setup: ExecutorSetup) -> Arc<Self> {
        Arc::new(Self {
            root: setup.drivers.root().clone(),
            drivers: setup.drivers,
            ids: setup.ids,
            state_dir: setup.state_dir,
            registry: setup.registry,
            addresses: setup.addresses,
            write_timeout: setup.write_timeout,
            vf_wait: setup.vf_wait,
            group_wait: setup.group_wait,
            vfio: setup.vfio,
            next_id: AtomicU64::new(0),
            running: Mutex::new(Vec::new()),
            idle: Condvar::new(),
            unfinished: Mutex::new(Vec::new()),
            listener: Mutex::new(None),
            stopping: AtomicBool::new(false),
            die_before_step: setup.die_before_step,
        })
    }

    /// Whether the failpoint says the daemon dies now, before step `index` of a fresh plan.
    /// Once dead, it takes no more plans (a test then opens the state again, as a restart).
    fn dies_before(&self, index: usize, mode: Mode) -> bool {
        if mode != Mode::Fresh || self.die_before_step != Some(index) {
            return false;
        }
        self.stopping.store(true, Ordering::Release);
        true
    }

    fn failpoint_armed(&self) -> bool {
        self.die_before_step.is_some()
    }

    /// Where plans that finish after their caller was answered are announced.
    pub fn set_listener(&self, listener: Listener) {
        *lock(&self.listener) = Some(listener);
    }

    /// Runs `plan` under `guard` and returns what changed, or why nothing did (everything it did
    /// undone), or `Stalled` when the kernel has not returned from a write within the time
    /// limit (the plan goes on).
    pub fn run(
        self: &Arc<Self>,
        caller: &Caller,
        plan: Plan,
        guard: LockGuard,
    ) -> Result<Vec<Change>, Error> {
        if plan.is_empty() {
            return Ok(Vec::new());
        }
        if self.stopping.load(Ordering::Acquire) {
            return Err(Error::Busy(
                "the daemon is stopping; try again once it is back".into(),
            ));
        }
        let journal = if plan.touches_kernel() {
            Some(JournalEntry::begin(&self.state_dir, &plan)?)
        } else {
            None
        };
        let progress = Arc::new(Progress::default());
        let id = self.enter(&plan, &progress);
        let delivery = Arc::new((Mutex::new(Delivery::default()), Condvar::new()));
        let worker = {
            let this = Arc::clone(self);
            let delivery = Arc::clone(&delivery);
            let progress = Arc::clone(&progress);
            let caller = caller.clone();
            move || {
                let mut guard = guard;
                let drivers = this.drivers.with_progress(progress);
                let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    this.execute(&plan, &drivers, &mut guard, Mode::Fresh, journal.as_ref())
                }));
                let (result, end) = run.unwrap_or_else(|_| {
                    // A bug, not a kernel answer: the plan may be half done. Keep its journal
                    // and undo it before its devices are used again.
                    (
                        Err(Error::Failed(format!(
                            "internal error while running a {}; it is undone before its \
                             devices are used again",
                            plan.operation
                        ))),
                        JournalEnd::KeepToUndo,
                    )
                });
                this.end_journal(&plan, journal, end);
                log_outcome(&caller, &plan, &result);
                let (slot, ready) = &*delivery;
                let mut slot = lock(slot);
                if slot.detached {
                    drop(slot);
                    this.announce_late(&plan, &result);
                } else {
                    slot.result = Some(result);
                    ready.notify_all();
                }
                // Locks go only now: the journal is gone (or kept as unfinished) by here.
                drop(guard);
                this.leave(id);
            }
        };
        if let Err(e) = std::thread::Builder::new()
            .name("plan".into())
            .spawn(worker)
        {
            self.leave(id);
            return Err(Error::Thread(e));
        }
        self.wait_for(&delivery, &progress)
    }

    /// Waits for the worker's result, or answers `Stalled` once a write has been stuck past
    /// the time limit (the worker then announces its result itself).
    fn wait_for(
        &self,
        delivery: &(Mutex<Delivery>, Condvar),
        progress: &Progress,
    ) -> Result<Vec<Change>, Error> {
        let (slot, ready) = delivery;
        let mut slot = lock(slot);
        loop {
            if let Some(result) = slot.result.take() {
                return result;
            }
            if let Some((what, waited)) = progress.stalled(self.write_timeout) {
                slot.detached = true;
                return Err(Error::Stalled { what, waited });
            }
            slot = ready
                .wait_timeout(slot, POLL)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn enter(&self, plan: &Plan, progress: &Arc<Progress>) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let keys: Vec<String> = plan.locks.iter().map(LockKey::to_string).collect();
        lock(&self.running).push((
            id,
            RunningPlan {
                description: format!("{} ({})", plan.operation, keys.join(", ")),
                started: Instant::now(),
                progress: Arc::clone(progress),
            },
        ));
        id
    }

    fn leave(&self, id: u64) {
        let mut running = lock(&self.running);
        running.retain(|(i, _)| *i != id);
        if running.is_empty() {
            self.idle.notify_all();
        }
    }

    /// Plans running now, one line each; those waiting on the kernel say for what.
    pub fn pending(&self) -> Vec<String> {
        lock(&self.running)
            .iter()
            .map(|(_, p)| match p.progress.stalled(Duration::ZERO) {
                Some((what, waited)) if waited >= self.write_timeout => format!(
                    "{}: pending for {} s: the kernel has not returned from {what}",
                    p.description,
                    waited.as_secs()
                ),
                _ => format!(
                    "{}: running for {} ms",
                    p.description,
                    p.started.elapsed().as_millis()
                ),
            })
            .collect()
    }

    /// Stops taking plans and waits until none is running (a write blocked in the kernel keeps
    /// its plan running until the kernel returns).
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
        let mut running = lock(&self.running);
        while !running.is_empty() {
            running = self
                .idle
                .wait_timeout(running, Duration::from_millis(200))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn announce_late(&self, plan: &Plan, result: &Result<Vec<Change>, Error>) {
        let Ok(changes) = result else {
            return;
        };
        let announcement = Announcement {
            changes: changes.clone(),
            vfs: vf_counts(plan),
        };
        if let Some(listener) = &*lock(&self.listener) {
            listener(announcement);
        }
    }

    /// Runs the steps; on a failure undoes what was done and says how that went. Returns the
    /// outcome and what becomes of the journal: removed, or kept because the plan is not over
    /// (its undo failed; or, under a test failpoint, the daemon "died").
    fn execute(
        &self,
        plan: &Plan,
        drivers: &Drivers,
        guard: &mut LockGuard,
        mode: Mode,
        journal: Option<&JournalEntry>,
    ) -> (Result<Vec<Change>, Error>, JournalEnd) {
        let mut done: Vec<Done> = Vec::new();
        let mut failure: Option<(Error, Option<usize>)> = None;
        let mut i = 0;
        while i < plan.steps.len() {
            if self.dies_before(i, mode) {
                return (Err(simulated_crash()), JournalEnd::Abandon);
            }
            if plan.steps[i].is_record() {
                let end = record_run_end(plan, i);
                if let Err(e) = self.record(plan, i..end, &mut done) {
                    failure = Some((e, None));
                    break;
                }
                i = end;
                continue;
            }
            let end = self.run_end(plan, i);
            if end - i > 1 && !self.failpoint_armed() {
                if let Err(e) = self.bind_side_by_side(plan, i..end, drivers, &mut done) {
                    failure = Some((e, None));
                    break;
                }
                i = end;
                continue;
            }
            match self.step(&plan.steps[i], drivers, guard, mode, plan) {
                Ok(change) => done.push(Done {
                    index: i,
                    change,
                    recorded: false,
                }),
                Err(e) => {
                    failure = Some((e, Some(i)));
                    break;
                }
            }
            i += 1;
        }
        let Some((cause, failed_at)) = failure else {
            if self.dies_before(plan.steps.len(), mode) {
                return (Err(simulated_crash()), JournalEnd::Abandon);
            }
            return (
                Ok(done.into_iter().filter_map(|d| d.change).collect()),
                JournalEnd::Remove,
            );
        };
        if let Some(j) = journal
            && let Err(e) = j.mark_undoing(plan)
        {
            warn!(error = %e, "cannot mark the journal as undoing");
        }
        // After a crash any step may be half done, whether this run got to it or not.
        let result = match mode {
            Mode::Fresh => self.undo(plan, &done, failed_at, drivers, cause),
            Mode::Recover => self.undo(plan, &all_steps(plan), None, drivers, cause),
        };
        let end = match result {
            Error::RollbackFailed { .. } => JournalEnd::KeepToUndo,
            _ => JournalEnd::Remove,
        };
        (Err(result), end)
    }

    /// Ends a plan's journal as [`Self::execute`] said: removed, or kept as unfinished (to undo,
    /// or only to remove when removing failed).
    fn end_journal(&self, plan: &Plan, journal: Option<JournalEntry>, end: JournalEnd) {
        let Some(journal) = journal else {
            return;
        };
        match end {
            JournalEnd::Abandon => return,
            JournalEnd::KeepToUndo => {
                lock(&self.unfinished).push(Unfinished {
                    plan: plan.clone(),
                    journal,
                    undo: true,
                });
                return;
            }
            JournalEnd::Remove => {}
        }
        if let Err(e) = journal.finish() {
            warn!(journal = %journal.name(), error = %e,
                "cannot remove the journal of a finished plan");
            lock(&self.unfinished).push(Unfinished {
                plan: plan.clone(),
                journal,
                undo: false,
            });
        }
    }

    /// Deals with unfinished plans on `keys` before an operation uses them: undoes them (or
    /// removes their journals). Fails when that is still impossible; nothing new may start then.
    pub fn settle(&self, guard: &mut LockGuard) -> Result<(), Error> {
        let mine: Vec<Unfinished> = {
            let mut all = lock(&self.unfinished);
            let (mine, others): (Vec<_>, Vec<_>) = all
                .drain(..)
                .partition(|u| u.plan.locks.iter().any(|k| guard.keys().contains(k)));
            *all = others;
            mine
        };
        let mut first_error = None;
        for u in mine {
            let outcome = if u.undo {
                let drivers = self.drivers.with_progress(Arc::default());
                match self.undo(
                    &u.plan,
                    &all_steps(&u.plan),
                    None,
                    &drivers,
                    Error::Failed("an earlier operation failed".into()),
                ) {
                    Error::RollbackFailed { undo, .. } => Err(*undo),
                    _ => Ok(()),
                }
            } else {
                Ok(())
            };
            match outcome {
                Ok(()) => {
                    if let Err(e) = u.journal.finish() {
                        first_error.get_or_insert(Error::from(e));
                        lock(&self.unfinished).push(Unfinished { undo: false, ..u });
                    } else {
                        info!(journal = %u.journal.name(),
                            "an earlier unfinished {} is settled", u.plan.operation);
                    }
                }
                Err(e) => {
                    first_error.get_or_insert(Error::Unfinished {
                        operation: u.plan.operation.to_string(),
                        on: describe_keys(&u.plan.locks),
                        cause: Box::new(e),
                    });
                    lock(&self.unfinished).push(u);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Plans kept as unfinished, one line each.
    pub fn unfinished(&self) -> Vec<String> {
        lock(&self.unfinished)
            .iter()
            .map(|u| {
                format!(
                    "{} on {}: {} (journal {})",
                    u.plan.operation,
                    describe_keys(&u.plan.locks),
                    if u.undo {
                        "could not be undone; it is undone before these are used again"
                    } else {
                        "done, but its journal could not be removed"
                    },
                    u.journal.name()
                )
            })
            .collect()
    }

    /// Finishes or undoes a plan found in the journal at start. Returns one line saying what
    /// happened; an error when the devices could not be put in a safe state.
    pub fn recover(
        &self,
        plan: &Plan,
        undoing: bool,
        journal: JournalEntry,
        guard: &mut LockGuard,
    ) -> Result<String, Error> {
        let drivers = self.drivers.with_progress(Arc::default());
        let subject = subject(plan);
        let op = plan.operation;
        if plan.on_crash == OnCrash::Finish && !undoing {
            let (result, end) = self.execute(plan, &drivers, guard, Mode::Recover, Some(&journal));
            self.end_journal(plan, Some(journal), end);
            return match result {
                Ok(_) => Ok(format!("{subject}: interrupted {op} finished")),
                Err(e @ Error::RollbackFailed { .. }) => Err(Error::Recovery {
                    subject,
                    operation: op.to_string(),
                    cause: Box::new(e),
                }),
                Err(e) => Ok(format!("{subject}: interrupted {op} undone: {e}")),
            };
        }
        let undone = self.undo(
            plan,
            &all_steps(plan),
            None,
            &drivers,
            Error::Failed("interrupted".into()),
        );
        let failed = matches!(undone, Error::RollbackFailed { .. });
        let end = if failed {
            JournalEnd::KeepToUndo
        } else {
            JournalEnd::Remove
        };
        self.end_journal(plan, Some(journal), end);
        if failed {
            return Err(Error::Recovery {
                subject,
                operation: op.to_string(),
                cause: Box::new(undone),
            });
        }
        let to = plan
            .steps
            .iter()
            .find_map(|s| match s {
                Step::SetNumVfs { was, .. } => Some(format!(" to {was} VFs")),
                _ => None,
            })
            .unwrap_or_default();
        let runtime = if plan.on_crash == OnCrash::Undo {
            "runtime "
        } else {
            ""
        };
        Ok(format!(
            "{subject}: interrupted {runtime}{op} rolled back{to}"
        ))
    }

    /// Where a run of steps starting at `i` that can go side by side ends: consecutive binds of
    /// functions in different IOMMU groups.
    fn run_end(&self, plan: &Plan, i: usize) -> usize {
        let mut end = i;
        while end < plan.steps.len() && matches!(plan.steps[end], Step::Bind { .. }) {
            end += 1;
        }
        end.max(i + 1)
    }

    /// One step. Returns the change of driver it made, if any.
    fn step(
        &self,
        step: &Step,
        drivers: &Drivers,
        guard: &mut LockGuard,
        mode: Mode,
        plan: &Plan,
    ) -> Result<Option<Change>, Error> {
        match step {
            Step::Guard { functions } => {
                if mode == Mode::Recover {
                    self.check_hard_rules(functions)?;
                }
                Ok(None)
            }
            Step::LoadVfio => drivers.ensure_vfio_loaded().map(|()| None),
            Step::Bind { target, from } => {
                let address = self.resolve(drivers, target)?;
                in_step(
                    target,
                    "binding",
                    drivers.bind_vfio(address, from.as_deref()),
                )
                .map(Some)
            }
            Step::Unbind { target, to } => {
                let address = self.resolve(drivers, target)?;
                in_step(target, "releasing", drivers.release(address, to.as_deref())).map(Some)
            }
            Step::Detach { target } => match self.resolve(drivers, target) {
                Ok(address) => drivers.detach(address).map(|old| {
                    Some(Change {
                        address,
                        old_driver: old,
                        new_driver: None,
                    })
                }),
                // Gone already: nothing to take it off.
                Err(_) => Ok(None),
            },
            Step::Probe { target } => {
                let address = self.resolve(drivers, target)?;
                let old = drivers.current_driver(address)?;
                let new = in_step(target, "probing", drivers.restore(address, None))?;
                Ok((old != new).then_some(Change {
                    address,
                    old_driver: old,
                    new_driver: new,
                }))
            }
            Step::SetAutoprobe { pf, on, .. } => {
                if drivers.autoprobe(*pf)? != *on {
                    drivers.set_autoprobe(*pf, *on)?;
                }
                Ok(None)
            }
            Step::SetNumVfs { pf, count, .. } => {
                drivers.set_num_vfs(*pf, *count, self.vf_wait)?;
                // New VFs bring new IOMMU groups (or reuse the numbers of old ones): lock them
                // too, so no other request takes a VF while it is being set up.
                let vfs = drivers.wait_for_vfs(*pf, *count, Duration::ZERO)?;
                let keys = self.lock_keys(&vfs)?;
                guard.extend(keys, &plan.operation.to_string(), self.group_wait)?;
                Ok(None)
            }
            Step::Reset { target } => {
                let address = self.resolve(drivers, target)?;
                let group = self.group_of(address)?;
                in_step(
                    target,
                    "resetting",
                    self.vfio
                        .reset(group, address)
                        .map_err(Error::from)
                        .map(|()| None),
                )
            }
            Step::Claim(_) | Step::Unclaim(_) | Step::SetVfs { .. } => Err(Error::Failed(
                "a record step reached the kernel path; this is a bug".into(),
            )),
        }
    }

    /// Applies consecutive record steps to the registry and saves state.toml once.
    fn record(
        &self,
        plan: &Plan,
        range: std::ops::Range<usize>,
        done: &mut Vec<Done>,
    ) -> Result<(), Error> {
        let mut registry = lock(&self.registry);
        let mut next = registry.clone();
        let mut changed = Vec::new();
        for index in range {
            changed.push((index, next.apply(&plan.steps[index])));
        }
        let persistent = changed.iter().any(|(i, c)| {
            *c && match &plan.steps[*i] {
                Step::Claim(r) | Step::Unclaim(r) => r.claim.is_persistent(),
                Step::SetVfs { now, was, .. } => now
                    .iter()
                    .chain(was.iter())
                    .any(|v| v.claim.is_persistent()),
                _ => false,
            }
        });
        if persistent {
            next.to_state().save(&self.state_dir)?;
        }
        *registry = next;
        done.extend(changed.into_iter().map(|(index, recorded)| Done {
            index,
            change: None,
            recorded,
        }));
        Ok(())
    }

    /// Binds the functions of consecutive Bind steps, IOMMU groups side by side: the kernel
    /// probes functions of different groups independently (most of a bind is the old driver's
    /// remove and vfio-pci's probe), while one group's members go one after another. After the
    /// first failure no new group is started.
    fn bind_side_by_side(
        &self,
        plan: &Plan,
        range: std::ops::Range<usize>,
        drivers: &Drivers,
        done: &mut Vec<Done>,
    ) -> Result<(), Error> {
        let mut lanes: std::collections::BTreeMap<LockKey, Vec<(usize, PciAddress)>> =
            std::collections::BTreeMap::new();
        // VFs this plan creates are bound in index order, as the kernel made them, so a failure
        // leaves the fewest to undo; everything else goes by IOMMU group.
        let created: BTreeSet<PciAddress> = vf_counts(plan).into_iter().map(|(pf, _)| pf).collect();
        for index in range {
            let Step::Bind { target, .. } = &plan.steps[index] else {
                continue;
            };
            let address = self.resolve(drivers, target)?;
            let lane = match target {
                Target::Vf { pf, .. } if created.contains(pf) => LockKey::Function(*pf),
                _ => self
                    .lock_keys(&[address])?
                    .into_iter()
                    .next()
                    .unwrap_or(LockKey::Function(address)),
            };
            lanes.entry(lane).or_default().push((index, address));
        }
        let workers = std::thread::available_parallelism()
            .map_or(2, |n| n.get())
            .clamp(2, MAX_BIND_THREADS)
            .min(lanes.len());
        let queue = Mutex::new(lanes.into_values());
        let failed = AtomicBool::new(false);
        // Every result lands here as soon as it is known, so even a worker that panics
        // afterwards cannot take a bound function out of the undo.
        let results: Mutex<Vec<(usize, Result<Change, Error>)>> = Mutex::new(Vec::new());
        let bind_lane = || {
            while !failed.load(Ordering::Acquire) {
                let Some(lane) = lock(&queue).next() else {
                    return;
                };
                for (index, address) in lane {
                    let Step::Bind { target, from } = &plan.steps[index] else {
                        continue;
                    };
                    let result = in_step(
                        target,
                        "binding",
                        drivers.bind_vfio(address, from.as_deref()),
                    );
                    let stop = result.is_err();
                    lock(&results).push((index, result));
                    if stop {
                        failed.store(true, Ordering::Release);
                        break;
                    }
                }
            }
        };
        let panicked = std::thread::scope(|scope| {
            let handles: Vec<_> = (1..workers).map(|_| scope.spawn(bind_lane)).collect();
            bind_lane();
            handles.into_iter().any(|h| h.join().is_err())
        });
        let mut results = results.into_inner().unwrap_or_else(|p| p.into_inner());
        results.sort_by_key(|(index, _)| *index);
        let mut failure = None;
        for (index, result) in results {
            match result {
                Ok(change) => done.push(Done {
                    index,
                    change: Some(change),
                    recorded: false,
                }),
                Err(e) if failure.is_none() => failure = Some(e),
                Err(e) => warn!(error = %e, "another bind of the same plan failed too"),
            }
        }
        if failure.is_none() && panicked {
            failure = Some(Error::Failed("a bind worker stopped unexpectedly".into()));
        }
        failure.map_or(Ok(()), Err)
    }

    /// Undoes `done` (and the half-done step `failed_at`) in reverse, trying every undo even
    /// after one fails. Returns the error the plan ends with: `cause` with what was put back,
    /// or a rollback failure carrying both.
    fn undo(
        &self,
        plan: &Plan,
        done: &[Done],
        failed_at: Option<usize>,
        drivers: &Drivers,
        cause: Error,
    ) -> Error {
        let mut undo_failure: Option<Error> = None;
        let mut put_back = Vec::new();
        let mut released = 0;
        // A failed step may be half done: undo it too (undos are idempotent).
        let half: Vec<Done> = failed_at
            .filter(|&i| !matches!(plan.steps[i], Step::Bind { .. }))
            .map(|index| Done {
                index,
                change: None,
                recorded: false,
            })
            .into_iter()
            .collect();
        let mut order: Vec<&Done> = done.iter().chain(half.iter()).collect();
        order.sort_by_key(|d| d.index);
        let mut records = Vec::new();
        for d in order.into_iter().rev() {
            let step = &plan.steps[d.index];
            if step.is_record() {
                if d.recorded {
                    records.push(d.index);
                }
                continue;
            }
            // Records come last in every plan: revert them before the kernel steps before them.
            if !records.is_empty() {
                if let Err(e) = self.unrecord(plan, &records) {
                    undo_failure.get_or_insert(e);
                }
                records.clear();
            }
            match self.undo_step(step, drivers) {
                Ok(Some(address)) => {
                    if matches!(step, Step::Bind { .. }) {
                        released += 1;
                    }
                    if d.change.is_some() {
                        put_back.push(address);
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    warn!(error = %e, "undoing a step failed");
                    undo_failure.get_or_insert(e);
                }
            }
        }
        if !records.is_empty()
            && let Err(e) = self.unrecord(plan, &records)
        {
            undo_failure.get_or_insert(e);
        }
        if let Some(undo) = undo_failure {
            return Error::RollbackFailed {
                cause: Box::new(cause),
                undo: Box::new(undo),
            };
        }
        let mut note = String::new();
        let vf_plan = plan.steps.iter().find_map(|s| match s {
            Step::SetNumVfs {
                was, was_on_vfio, ..
            } => Some((*was, was_on_vfio.clone())),
            _ => None,
        });
        match vf_plan {
            Some((was, was_on_vfio)) => {
                note.push_str(&format!("; rolled back: {was} VFs, {released} released"));
                if !was_on_vfio.is_empty() {
                    let list: Vec<String> = was_on_vfio.iter().map(u32::to_string).collect();
                    note.push_str(&format!("; VFs {} are back on vfio-pci", list.join(", ")));
                }
            }
            None if !put_back.is_empty() => {
                put_back.sort();
                let list: Vec<String> = put_back.iter().map(PciAddress::to_string).collect();
                note.push_str(&format!("; {} put back as well", list.join(", ")));
            }
            None => {}
        }
        if note.is_empty() {
            cause
        } else {
            Error::RolledBack {
                cause: Box::new(cause),
                undone: note,
            }
        }
    }

    /// Undoes one kernel step; returns the function it put back, if any.
    fn undo_step(&self, step: &Step, drivers: &Drivers) -> Result<Option<PciAddress>, Error> {
        let existing = |target: &Target| self.resolve(drivers, target).ok();
        match step {
            Step::Guard { .. } | Step::LoadVfio | Step::Reset { .. } => Ok(None),
            Step::Bind { target, from } => {
                let Some(address) = existing(target) else {
                    return Ok(None);
                };
                match (target, from) {
                    // A VF that had no driver (a new one) goes back to none, not to its host
                    // VF driver.
                    (Target::Vf { .. }, None) => drivers.detach(address).map(drop)?,
                    _ => drivers.restore(address, from.as_deref()).map(drop)?,
                }
                Ok(Some(address))
            }
            Step::Unbind { target, .. } | Step::Detach { target } => {
                let Some(address) = existing(target) else {
                    return Ok(None);
                };
                drivers.bind_vfio(address, None)?;
                Ok(Some(address))
            }
            Step::Probe { target } => {
                let Some(address) = existing(target) else {
                    return Ok(None);
                };
                drivers.detach(address)?;
                Ok(Some(address))
            }
            Step::SetAutoprobe { pf, was, .. } => {
                if !drivers.exists(*pf) {
                    return Ok(None);
                }
                if drivers.autoprobe(*pf)? != *was {
                    drivers.set_autoprobe(*pf, *was)?;
                }
                if *was {
                    // What autoprobe would have given the VFs that came up without a driver.
                    let count = drivers.num_vfs(*pf)?;
                    for vf in drivers.wait_for_vfs(*pf, count, self.vf_wait)? {
                        if drivers.current_driver(vf)?.is_none() {
                            drivers.restore(vf, None)?;
                        }
                    }
                }
                Ok(None)
            }
            Step::SetNumVfs {
                pf,
                was,
                was_on_vfio,
                ..
            } => {
                if !drivers.exists(*pf) {
                    return Ok(None);
                }
                drivers.set_num_vfs(*pf, *was, self.vf_wait)?;
                for &index in was_on_vfio {
                    if let Some(vf) = drivers.vf(*pf, index)? {
                        drivers.bind_vfio(vf, None).map_err(|e| {
                            in_step_error(&Target::Vf { pf: *pf, index }, "binding", e)
                        })?;
                    }
                }
                Ok(None)
            }
            Step::Claim(_) | Step::Unclaim(_) | Step::SetVfs { .. } => Ok(None),
        }
    }

    /// Reverts record steps (by index) in the registry and state.toml.
    fn unrecord(&self, plan: &Plan, indexes: &[usize]) -> Result<(), Error> {
        let mut registry = lock(&self.registry);
        let mut next = registry.clone();
        for &i in indexes {
            next.revert(&plan.steps[i]);
        }
        if next.to_state() != registry.to_state() {
            next.to_state().save(&self.state_dir)?;
        }
        *registry = next;
        Ok(())
    }

    /// The address a target has now.
    fn resolve(&self, drivers: &Drivers, target: &Target) -> Result<PciAddress, Error> {
        match *target {
            Target::Function(address) if drivers.exists(address) => Ok(address),
            Target::Function(address) => Err(Error::NoSuchDevice(address)),
            Target::Vf { pf, index } => drivers
                .vf(pf, index)?
                .ok_or_else(|| Error::Failed(format!("{pf} has no VF {index} now"))),
        }
    }

    /// The lock of each function, from its `iommu_group` link.
    pub fn lock_keys(&self, addresses: &[PciAddress]) -> Result<BTreeSet<LockKey>, Error> {
        addresses
            .iter()
            .map(|&address| {
                if !self.drivers.exists(address) {
                    return Err(Error::NoSuchDevice(address));
                }
                let link = self.root.pci_device_attr(address, "iommu_group");
                let group = read_link_name(&link)?.and_then(|name| name.parse().ok());
                Ok(group.map_or(LockKey::Function(address), LockKey::Group))
            })
            .collect()
    }

    /// The IOMMU group of a function, for VFIO.
    fn group_of(&self, address: PciAddress) -> Result<u32, Error> {
        let link = self.root.pci_device_attr(address, "iommu_group");
        read_link_name(&link)?
            .and_then(|name| name.parse().ok())
            .ok_or_else(|| Error::Failed(format!("{address} is in no IOMMU group")))
    }

    /// The hard safety rules and "in use" for `functions` (that still exist), now.
    fn check_hard_rules(&self, functions: &[PciAddress]) -> Result<(), Error> {
        let present: Vec<PciAddress> = functions
            .iter()
            .copied()
            .filter(|a| self.drivers.exists(*a))
            .collect();
        if present.is_empty() {
            return Ok(());
        }
        let keys = self.lock_keys(&present)?;
        let inventory = inventory_of(&self.root, &self.ids, &keys)?;
        let found: Vec<&PciFunction> = present
            .iter()
            .filter_map(|a| inventory.function(*a))
            .collect();
        let snapshot = HostSnapshot::gather(&self.root, &found, self.addresses.as_ref());
        for f in found {
            let findings: Vec<_> = snapshot
                .check(f)
                .into_iter()
                .filter(|x| x.severity != Severity::Soft)
                .collect();
            crate::observe::guard::decide(f.address, &findings, true)?;
        }
        Ok(())
    }
}

/// The functions and groups behind `keys`, read fresh.
pub fn inventory_of(
    root: &SysfsRoot,
    ids: &PciIds,
    keys: &BTreeSet<LockKey>,
) -> Result<Inventory, Error> {
    let mut groups = Vec::new();
    let mut loose = Vec::new();
    for key in keys {
        match *key {
            LockKey::Group(g) => groups.push(g),
            LockKey::Function(a) => loose.push(a),
        }
    }
    Ok(Inventory::scan_groups(root, ids, &groups, &loose)?)
}

fn simulated_crash() -> Error {
    Error::Failed("the daemon died here (test failpoint)".into())
}

/// Every step of `plan`, as if done: what an undo after a crash goes through.
fn all_steps(plan: &Plan) -> Vec<Done> {
    (0..plan.steps.len())
        .map(|index| Done {
            index,
            change: None,
            recorded: true,
        })
        .collect()
}

/// Consecutive record steps from `i`.
fn record_run_end(plan: &Plan, i: usize) -> usize {
    let mut end = i;
    while end < plan.steps.len() && plan.steps[end].is_record() {
        end += 1;
    }
    end
}

/// Names the step when its target is a VF (a function's address is in the message already).
fn in_step<T>(target: &Target, verb: &str, result: Result<T, Error>) -> Result<T, Error> {
    result.map_err(|e| in_step_error(target, verb, e))
}

fn in_step_error(target: &Target, verb: &str, e: Error) -> Error {
    match target {
        Target::Vf { .. } => Error::InStep {
            step: format!("{verb} {target}"),
            cause: Box::new(e),
        },
        Target::Function(_) => e,
    }
}

/// What a plan is about, for recovery lines: the PF of a VF plan, else its functions.
fn subject(plan: &Plan) -> String {
    let pf = plan.steps.iter().find_map(|s| match s {
        Step::SetNumVfs { pf, .. } | Step::SetAutoprobe { pf, .. } => Some(*pf),
        _ => None,
    });
    if let Some(pf) = pf {
        return pf.to_string();
    }
    let mut targets: Vec<String> = plan
        .steps
        .iter()
        .filter_map(|s| match s {
            Step::Bind { target, .. }
            | Step::Unbind { target, .. }
            | Step::Detach { target }
            | Step::Probe { target } => Some(target.to_string()),
            _ => None,
        })
        .collect();
    targets.dedup();
    if targets.is_empty() {
        describe_keys(&plan.locks)
    } else {
        targets.join(", ")
    }
}

fn describe_keys(keys: &BTreeSet<LockKey>) -> String {
    keys.iter()
        .map(LockKey::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The VF count each SetNumVfs step of a finished plan set.
fn vf_counts(plan: &Plan) -> Vec<(PciAddress, u32)> {
    plan.steps
        .iter()
        .filter_map(|s| match s {
            Step::SetNumVfs { pf, count, .. } => Some((*pf, *count)),
            _ => None,
        })
        .collect()
}

/// One log line per changed function, one for a failure.
fn log_outcome(caller: &Caller, plan: &Plan, result: &Result<Vec<Change>, Error>) {
    match result {
        Ok(changes) => {
            for c in changes {
                info!(uid = caller.uid, caller = %caller.bus_name, operation = %plan.operation,
                    device = %c.address,
                    old_driver = c.old_driver.as_deref().unwrap_or("none"),
                    new_driver = c.new_driver.as_deref().unwrap_or("none"), "driver changed");
            }
        }
        Err(e) => {
            warn!(uid = caller.uid, caller = %caller.bus_name, operation = %plan.operation,
                error = %e, "plan failed");
        }
    }
}
