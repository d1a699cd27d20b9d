-- imaging: studies from the modalities and the PACS (DICOM C-STORE), and
-- what the AI endpoints make of them.
--
-- on_study runs once per study, when it is stable (no new instance for the
-- quiet period, or an explicit "complete"), with the order the engine
-- matched it to: study.match says how ("accession", "study_uid",
-- "patient_modality_time" or "none") and study.order is the record the
-- orders channel kept (priority, reason, procedure, ...), or json.null.
-- A study without an order is recorded (filtered) for review. Routing
-- rules: which AI endpoints see which studies.
--
-- on_result runs once per AI result (r.job, r.result, r.study, and r.sr: the
-- result's DICOM SR when there are findings): the ORU to the RIS, the SR to
-- the PACS, and for critical findings a priority update for the reading
-- worklist and a page. The endpoint's rollout mode decides what of this
-- is sent: silent nothing, assistant the ORU only, active everything.
local rad = require("radiology")

function on_study(study, ctx)
  if study.order == json.null then
    ctx:log("warn", "study without a matching order", study.modality, study.instances)
    ctx:filter("no matching order")
    return
  end
  if study.order.status == "cancelled" then
    ctx:filter("the order was cancelled")
    return
  end
  ctx:log("info", "study", study.match, study.order.priority, study.modality, study.instances)
  -- Each study goes to every model made for it (the endpoints' "takes"
  -- check modality and body part again). Non-contrast CT head: the
  -- hemorrhage model; chest radiograph: the pneumothorax model.
  local part = (study.body_part or ""):upper()
  if study.modality == "CT" and part == "HEAD" then
    ctx:route("hemorrhage", study)
  end
  if (study.modality == "CR" or study.modality == "DX") and part == "CHEST" then
    ctx:route("pneumothorax", study)
  end
end

function on_result(r, ctx)
  local res = r.result
  ctx:log("info", "ai result", r.job.endpoint, res.status, #(res.findings or {}))
  if res.status ~= "completed" then
    return
  end
  ctx:route("ris", rad.ai_oru(r, r.job.id .. "-ORU"))
  if r.sr then -- the engine wrote the result's DICOM SR (TID 1500)
    ctx:route("pacs", {files = {r.sr}})
  end
  local critical = nil
  for _, f in ipairs(res.findings or {}) do
    if f.critical then critical = critical or f end
  end
  local order = r.study ~= json.null and r.study.order or json.null
  if critical and order ~= json.null then
    ctx:route("worklist", rad.priority_update(order, r.job.id .. "-PRI", "STAT_AI_POSITIVE"),
              {priority = "critical"})
    ctx:route("pager", {
      study_uid = r.study.study_uid,
      accession = r.study.accession,
      finding = critical.label or critical.code.meaning,
      code = critical.code,
      acr_category = critical.acr_category or 1,
      model = res.model.name .. " " .. res.model.version,
      job_id = r.job.id,
    }, {priority = "critical"})
  end
end
