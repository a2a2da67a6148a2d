"""Generate the Orchid Veterinary Clinic handbook as DOCX and PDF.

Writes kb/handbook.docx next to this script (Word heading styles, bullets,
one table) and ../orchid-clinic-pdf/kb/handbook.pdf with the same text
(headings as larger bold lines).

Needs python-docx and fpdf2 (``pip install python-docx fpdf2``); fpdf2 is
only needed here, not by agentpeft.
"""

from __future__ import annotations

import datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
DOCX_OUT = HERE / "kb" / "handbook.docx"
PDF_OUT = HERE.parent / "orchid-clinic-pdf" / "kb" / "handbook.pdf"

TITLE = "Orchid Veterinary Clinic: Staff and Client Handbook"

# The handbook as a list of blocks: ("h1", text), ("h2", text), ("p", text),
# ("bullets", [items]) or ("table", [header, *rows]).
CONTENT = [
    ("p", "This handbook describes how Orchid Veterinary Clinic works, for our clients and for everyone "
          "on the team. Clients will find our opening hours, fees and what to expect when their animal "
          "comes in for treatment. Staff will also find the policies on shifts, leave, uniforms and "
          "medicines. If anything in this handbook is unclear, please ask the Practice Manager, Colm Ardagh."),

    ("h1", "About the Clinic"),
    ("h2", "Opening Hours"),
    ("p", "The clinic at 27 Linden Row is open from 8:00 to 19:00 on weekdays and from 9:00 to 13:00 on "
          "Saturdays. We are closed on Sundays and public holidays. The reception telephone line opens "
          "fifteen minutes after the doors, so that the morning admissions can be handled without "
          "interruptions. On the first Wednesday of every month the clinic closes at 17:00 for the whole-team "
          "training afternoon."),
    ("h2", "Our Team"),
    ("p", "The clinic is led by the Clinical Director, Dr Hana Voss, who is responsible for all clinical "
          "standards and for the controlled drugs register. Colm Ardagh, the Practice Manager, looks after "
          "rotas, leave, purchasing and client complaints. We have four veterinary surgeons, six registered "
          "veterinary nurses, two patient care assistants and a reception team of five."),

    ("h1", "Appointments"),
    ("h2", "Booking an Appointment"),
    ("p", "Clients can book through the OrchidPaws online portal at any time, or by calling reception on "
          "0161 496 0732 during opening hours. A standard consultation lasts 15 minutes. If your animal has "
          "several problems, or you would like to discuss a long-term condition, please ask for an extended "
          "consultation of 30 minutes so that the vet has enough time. New clients are asked to arrive ten "
          "minutes early to complete the registration form."),
    ("p", "When you come to your first appointment, please bring:"),
    ("bullets", [
        "your pet's vaccination card or previous clinical records, if you have them;",
        "a list of any medicines, supplements or special food your pet is taking;",
        "cats, rabbits and other small animals in a secure carrier, and dogs on a short lead;",
        "your pet insurance policy number, if your pet is insured.",
    ]),
    ("h2", "Late Arrivals and Missed Appointments"),
    ("p", "Our vets work to a tight schedule, and a late start affects every client after you. If you arrive "
          "more than 10 minutes late, we may need to offer you a later slot on the same day or rebook you. "
          "Please cancel at least 24 hours in advance if you cannot come. We do not charge for a first missed "
          "appointment, but a second missed appointment within 12 months is charged a fee of $32, which must "
          "be paid before the next booking can be made."),
    ("h2", "Home Visits"),
    ("p", "We offer home visits for animals that cannot easily travel, for example elderly dogs, very "
          "nervous cats and for euthanasia at home. Home visits take place on Tuesday and Thursday afternoons "
          "within a radius of 8 miles of the clinic. A call-out fee is charged in addition to the consultation "
          "fee; see the fee table below."),

    ("h1", "Fees and Payment"),
    ("h2", "Fee Schedule"),
    ("p", "The following fees apply from the start of the current financial year and include sales tax. "
          "Medicines, laboratory tests and procedures are charged separately."),
    ("table", [
        ["Service", "Fee", "Notes"],
        ["Standard consultation (15 minutes)", "$58", "Includes a repeat check within 7 days for the same problem"],
        ["Extended consultation (30 minutes)", "$89", "For several problems or long-term conditions"],
        ["Nurse clinic", "$26", "Weight checks, nail clipping, suture removal"],
        ["Home visit call-out", "$95", "Added to the consultation fee"],
        ["Emergency consultation during opening hours", "$120", "For animals seen without an appointment"],
        ["Written prescription", "$18", "Per prescription form"],
    ]),
    ("h2", "Paying Your Bill"),
    ("p", "Payment is due at the end of each visit, by card or bank transfer; we no longer accept cheques. "
          "For surgery and hospital stays we ask for a deposit of half the written estimate when your animal "
          "is admitted. If a bill is larger than $400, clients who have been registered with us for at least "
          "a year can apply to the Practice Manager for the Orchid Spread payment plan, which splits the bill "
          "into three monthly payments without interest."),
    ("h2", "Pet Insurance Claims"),
    ("p", "We are happy to claim directly from most insurers, so that you only pay the excess. Direct claims "
          "must be agreed before treatment, and we charge an administration fee of $21 per claim form. Claim "
          "forms left with reception are completed by the vets within 5 working days."),

    ("h1", "Surgery and Anaesthesia"),
    ("h2", "Before Surgery"),
    ("p", "Most operations are planned in advance, and a few simple steps at home help to keep your animal "
          "safe under anaesthetic. The evening before the operation:"),
    ("bullets", [
        "give your dog or cat its last meal no later than 22:00;",
        "leave water available until 7:00 on the morning of the operation, then take it away;",
        "do not withhold food from rabbits, guinea pigs or other small herbivores, because fasting is "
        "dangerous for them - bring a small bag of their usual food with you;",
        "take your dog for a short walk before coming in so that it can empty its bladder.",
    ]),
    ("h2", "Admission and Discharge"),
    ("p", "Surgical patients are admitted between 8:00 and 8:45 in the morning. A nurse will go through the "
          "consent form with you, confirm your telephone number and agree the estimate. The vet will "
          "telephone you once your animal has woken up. Discharge appointments start at 15:30, and a nurse "
          "will explain the home-care instructions and any medicines at that appointment. Please allow 20 "
          "minutes for the discharge."),
    ("h2", "After Surgery"),
    ("p", "Keep your animal quiet and indoors for the first 48 hours. Most patients are sent home with a "
          "soft cone collar, which should stay on until the stitches are removed, even if your pet seems to "
          "hate it. We will book a free post-operative check 3 days after the operation, and the stitches "
          "are usually removed at a nurse clinic 10 to 12 days after surgery. If the wound becomes red, "
          "swollen or starts to leak, call us the same day."),

    ("h1", "Hospitalisation and Medical Boarding"),
    ("h2", "Visiting Hospitalised Pets"),
    ("p", "Animals that need to stay in the hospital ward can be visited every day between 14:00 and 16:00. "
          "To keep the ward calm, no more than 2 visitors at a time can see each patient, and visits are "
          "limited to 20 minutes. The nurse in charge of the ward telephones owners with a progress update "
          "by 11:00 each morning, so there is no need to call us for news before then."),
    ("h2", "Medical Boarding"),
    ("p", "Animals that need daily medication or monitoring, such as diabetic cats, can stay with us while "
          "their owners are away. Medical boarding costs $42 per night for cats and small animals and $55 "
          "per night for dogs, including the administration of medicines. Places are limited to six at a "
          "time and should be booked at least 2 weeks ahead. We do not offer boarding for healthy animals."),

    ("h1", "Emergencies"),
    ("h2", "During Opening Hours"),
    ("p", "If your animal has an emergency during opening hours, call us before setting off so that the team "
          "can prepare. Say the word \"emergency\" when reception answers. A registered nurse will assess "
          "every emergency within 10 minutes of arrival and decide how urgently the animal needs to see a vet. "
          "Animals that are bleeding heavily, cannot breathe or have collapsed are always seen immediately."),
    ("h2", "Outside Opening Hours"),
    ("p", "Outside our opening hours, emergency care is provided by our partner, Northfield Animal Emergency, "
          "at 14 Carrow Road. They are open every night and all weekend, and they send their clinical notes to "
          "us the following morning so that we can continue the treatment. Northfield charges its own fees, "
          "starting at $185 for an out-of-hours consultation, which are paid directly to them."),

    ("h1", "Medicines and Prescriptions"),
    ("h2", "Repeat Prescriptions"),
    ("p", "Repeat medicines can be ordered through the OrchidPaws portal or by telephone. Please give us "
          "48 hours' notice, so that the vet can check the records and the pharmacy can prepare the order. "
          "By law, we can only prescribe for animals that a vet has examined recently: for long-term medicines "
          "your pet needs a check-up at least every 6 months. If you prefer to buy medicines elsewhere, we can "
          "issue a written prescription for a fee."),
    ("h2", "Controlled Drugs"),
    ("p", "This section applies to staff. Controlled drugs are kept in the locked cabinet in the pharmacy "
          "room, and the key is held by the duty vet at all times; it must never be left in the cabinet or in "
          "a drawer. Every entry in the controlled drugs register must be checked and signed by two members "
          "of staff, at least one of whom is a vet. The register is reconciled against the stock every Monday "
          "morning by the duty vet and a registered nurse. Any discrepancy, however small, must be reported "
          "to the Clinical Director within 24 hours."),

    ("h1", "Staff Policies"),
    ("h2", "Shifts and Rota"),
    ("p", "The clinic runs two shifts on weekdays. The early shift runs from 7:45 to 16:15 and the late shift "
          "from 10:45 to 19:15; Saturday shifts run from 8:45 to 13:30. The rota is published on the staff "
          "noticeboard and in the shared calendar four weeks in advance. Staff may swap shifts with a "
          "colleague of the same role, but every swap has to be approved by the Practice Manager before it "
          "takes place."),
    ("h2", "Annual Leave"),
    ("p", "Full-time staff receive 28 days of annual leave, including public holidays. The leave year runs "
          "from 1 April to 31 March. Leave requests should be made in the HR system with at least 6 weeks' "
          "notice, and no more than two members of the nursing team can be on leave at the same time. Up to "
          "5 unused days can be carried over into the next leave year; any other unused days are lost."),
    ("h2", "Sickness Absence"),
    ("p", "If you are too ill to come to work, telephone the duty manager's mobile before 7:00 on the day. "
          "Text messages and social media messages are not accepted as notice of sickness. You may "
          "self-certify absences of up to 7 calendar days; for longer absences a doctor's fit note is needed. "
          "After every period of sickness you will have a short return-to-work meeting with your line manager."),
    ("h2", "Uniform and Protective Equipment"),
    ("p", "Each team member is given two sets of uniform when they start, and the uniform is replaced every "
          "year. The colours show roles at a glance:"),
    ("bullets", [
        "veterinary surgeons wear plum scrubs;",
        "registered nurses and patient care assistants wear navy scrubs;",
        "reception staff wear grey tunics with the Orchid logo.",
    ]),
    ("p", "Closed-toe, wipe-clean shoes must be worn in all clinical areas. Lead gowns and thyroid shields must "
          "be worn by everyone who stays in the X-ray room during an exposure, and personal dosimeter badges "
          "are sent for reading every three months."),
    ("h2", "Training and Professional Development"),
    ("p", "We support every clinical team member in keeping their skills up to date. Each registered nurse has "
          "a training budget of $600 per year and each vet a budget of $1,200, plus 3 paid study days. "
          "Requests for courses are made to the Clinical Director, and a short summary of what was learned "
          "is shared at the monthly team training afternoon."),

    ("h1", "Records and Privacy"),
    ("h2", "Clinical Records"),
    ("p", "Clinical records are kept for 7 years after an animal's last visit and are then securely deleted. "
          "Clients may ask for a copy of their animal's records at any time; we send the copy within 30 days, "
          "free of charge. When a pet moves to another practice, we transfer the full history directly to the "
          "new practice on request."),
    ("h2", "Confidentiality for Staff"),
    ("p", "Staff must lock their computer screen whenever they leave a workstation, even for a moment. "
          "Photographs of patients may only be taken on the clinic tablets, never on personal phones, and may "
          "only be shared on social media with the owner's written consent. Questions from the press or from "
          "anyone claiming to be a pet's owner on the phone must be passed to the Practice Manager."),
]


def write_docx(path: Path) -> None:
    from docx import Document
    from docx.shared import Pt

    doc = Document()
    doc.core_properties.title = TITLE
    doc.core_properties.author = "Orchid Veterinary Clinic"
    fixed = datetime.datetime(2024, 1, 1)
    doc.core_properties.created = fixed
    doc.core_properties.modified = fixed
    doc.add_heading(TITLE, level=0)
    for kind, value in CONTENT:
        if kind == "h1":
            doc.add_heading(value, level=1)
        elif kind == "h2":
            doc.add_heading(value, level=2)
        elif kind == "p":
            doc.add_paragraph(value)
        elif kind == "bullets":
            for item in value:
                doc.add_paragraph(item, style="List Bullet")
        elif kind == "table":
            header, *rows = value
            table = doc.add_table(rows=1, cols=len(header))
            table.style = "Table Grid"
            for cell, text in zip(table.rows[0].cells, header):
                cell.text = ""
                run = cell.paragraphs[0].add_run(text)
                run.bold = True
            for row in rows:
                cells = table.add_row().cells
                for cell, text in zip(cells, row):
                    cell.text = text
            for row in table.rows:
                for cell in row.cells:
                    for par in cell.paragraphs:
                        for run in par.runs:
                            run.font.size = Pt(10)
            doc.add_paragraph()
        else:
            raise ValueError(kind)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc.save(path)


def write_pdf(path: Path) -> None:
    from fpdf import FPDF

    pdf = FPDF(format="A4")
    pdf.set_creation_date(datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc))
    pdf.set_title(TITLE)
    pdf.set_author("Orchid Veterinary Clinic")
    pdf.set_margins(20, 20, 20)
    pdf.set_auto_page_break(True, margin=20)
    pdf.add_page()
    width = pdf.w - pdf.l_margin - pdf.r_margin

    pdf.set_font("Helvetica", "B", 20)
    pdf.multi_cell(width, 10, TITLE, new_x="LMARGIN", new_y="NEXT")
    pdf.ln(4)
    for kind, value in CONTENT:
        if kind == "h1":
            pdf.ln(4)
            pdf.set_font("Helvetica", "B", 16)
            pdf.multi_cell(width, 8, value, new_x="LMARGIN", new_y="NEXT")
            pdf.ln(1)
        elif kind == "h2":
            pdf.ln(2)
            pdf.set_font("Helvetica", "B", 13)
            pdf.multi_cell(width, 7, value, new_x="LMARGIN", new_y="NEXT")
        elif kind == "p":
            pdf.set_font("Helvetica", "", 11)
            pdf.multi_cell(width, 5.5, value, new_x="LMARGIN", new_y="NEXT")
            pdf.ln(2)
        elif kind == "bullets":
            pdf.set_font("Helvetica", "", 11)
            for item in value:
                pdf.set_x(pdf.l_margin + 4)
                pdf.multi_cell(width - 4, 5.5, "- " + item, new_x="LMARGIN", new_y="NEXT")
            pdf.ln(2)
        elif kind == "table":
            pdf.set_font("Helvetica", "", 10)
            with pdf.table(col_widths=(40, 15, 45), line_height=5.5) as table:
                for i, row in enumerate(value):
                    cells = table.row()
                    for text in row:
                        if i == 0:
                            pdf.set_font("Helvetica", "B", 10)
                        cells.cell(text)
                        pdf.set_font("Helvetica", "", 10)
            pdf.ln(3)
        else:
            raise ValueError(kind)
    path.parent.mkdir(parents=True, exist_ok=True)
    pdf.output(str(path))


def main() -> None:
    write_docx(DOCX_OUT)
    write_pdf(PDF_OUT)
    texts = []
    for _, value in CONTENT:
        if isinstance(value, str):
            texts.append(value)
        else:
            texts.extend(" ".join(v) if isinstance(v, list) else v for v in value)
    words = len(" ".join(texts).split())
    print(f"wrote {DOCX_OUT} and {PDF_OUT} ({words} words)")


if __name__ == "__main__":
    main()
